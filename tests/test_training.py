"""train-next for real jobs: penalty maths, divergence guard, resume after SIGTERM, torchrun/DDP, head growth."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import run_subprocess


def test_stabilized_coefficient_never_overshoots():
    from cl_tool.penalty import coefficients

    omega = torch.logspace(-4, 6, 50, dtype=torch.float64)
    for lam in (1.0, 100.0, 1e4):
        for lr in (1e-3, 0.05, 1.0):
            factor_stab = 1 - 2 * lr * coefficients("stabilized", [omega], lam, lr)[0]
            assert torch.all(factor_stab >= 0) and torch.all(factor_stab <= 1)
            torch.testing.assert_close(factor_stab, 1 / (1 + lr * lam * omega))
            factor_ewc = 1 - 2 * lr * coefficients("ewc", [omega], lam, lr)[0]
            # plain EWC overshoots exactly where lr*lam*omega > 2
            assert torch.equal(factor_ewc < -1, lr * lam * omega > 2)


def test_penalty_gradient_and_value_match_autograd():
    from cl_tool.penalty import QuadraticPenalty

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    anchors = [p.detach() + torch.randn_like(p) for p in params]
    omegas = [torch.rand_like(p) * 10 for p in params]
    for kind in ("ewc", "stabilized"):
        pen = QuadraticPenalty(kind, params, anchors, omegas, lam=7.0)
        lr = 0.03
        coef = [(7.0 * o / 2) if kind == "ewc" else 7.0 * o / (2 * (1 + lr * 7.0 * o)) for o in omegas]
        ref = sum((c * (p - a) ** 2).sum() for c, p, a in zip(coef, params, anchors))
        for p in params:
            p.grad = None
        ref.backward()
        expected = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        pen.add_gradient_(lr)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e)
        assert pen.value(lr) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_divergence_guard_plain_ewc_vs_stabilized(cli, anchored, demo_dir, tmp_path):
    common = [
        "--data",
        f"{demo_dir}::permute=1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--lambda",
        "1e6",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--limit",
        "600",
    ]
    out_ewc = tmp_path / "ewc.safetensors"
    r = cli("train-next", anchored, *common, "--penalty", "ewc", "-o", out_ewc)
    assert r.code == 5, r.err
    assert "diverged" in r.error_line and "stabilized" in r.error_line
    assert "warning" in r.err  # the η·λ·max Ω bound was reported before training
    assert not out_ewc.exists() and not any(p.name.startswith(".cl-tool-tmp") for p in tmp_path.iterdir())
    out_st = tmp_path / "st.safetensors"
    r = cli("train-next", anchored, *common, "--penalty", "stabilized", "-o", out_st, "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in res["epochs"])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _torchrun(nproc, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "cl_tool",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return proc


def test_torchrun_two_processes_match_one(cli, anchored, demo_dir, tmp_path):
    """2 gloo processes = 1 process on N ≡ 1 (mod B) samples: the last global batch has one sample, so rank 1's
    share of it is empty (it used to make a NaN loss there and a false "diverged" exit).

    ``--eval-data`` is sharded over the ranks (each evaluates a contiguous share, the sums are all-reduced): the
    figures the 2 processes log are those ``evaluate`` computes for the written weights in one process, the
    accuracy exactly, the loss to float rounding (measured: equal to the last digit, also to the 1-process run).

    Bounds, from what differs between the runs: only the order of float32 sums (rank shares summed by the
    all-reduce instead of inside one GEMM), ~1e-7 relative per step. Measured over 2 epochs (16 steps): weights
    within 1.5e-8 absolute (under 0.1 % of the asserted tolerance), epoch losses within 4e-8 relative, the same
    predictions. A prediction can only flip where two logits of a sample are within that rounding, so the
    accuracies are asserted equal to one sample per epoch, and every count (samples, steps) exactly.
    """
    n, b = 513, 64
    common = [
        "--data",
        f"{demo_dir}::permute=3,limit={n}",
        "--epochs",
        "2",
        "--batch-size",
        str(b),
        "--device",
        "cpu",
        "--lambda",
        "10",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--eval-data",
        f"held={demo_dir}::split=test,limit=301",
    ]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    p1 = _torchrun(1, "train-next", anchored, *common, "-o", one, "--log-json", tmp_path / "one.jsonl", "--json")
    assert p1.returncode == 0, p1.stderr
    p2 = _torchrun(2, "train-next", anchored, *common, "-o", two, "--log-json", tmp_path / "two.jsonl", "--json")
    assert p2.returncode == 0, p2.stderr
    a, b2 = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b2[k], rtol=1e-4, atol=1e-5)
    # The epoch statistics are over all ranks' samples (not rank 0's share), in the log and in --json alike.
    log1, log2 = ([json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert json.loads(p2.stdout)["epochs"] == log2
    for e1, e2 in zip(log1, log2, strict=True):
        assert e1["steps"] == e2["steps"] and e1["samples_per_s"] > 0
        assert abs(e1["train_accuracy"] - e2["train_accuracy"]) * n <= 1 + 1e-9, (e1, e2)
        assert e2["task_loss"] == pytest.approx(e1["task_loss"], rel=1e-5)
        assert e2["penalty"] == pytest.approx(e1["penalty"], rel=1e-4)
    assert json.loads(p2.stdout)["samples"] == json.loads(p1.stdout)["samples"] == n
    r = cli("evaluate", two, "--data", f"{demo_dir}::split=test,limit=301", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    (ev,) = json.loads(p2.stdout)["final_eval"]
    assert ev["samples"] == 301 and ev["accuracy"] == json.loads(r.out)["accuracy"][0][0], ev
    assert ev["loss"] == pytest.approx(json.loads(r.out)["loss"][0][0], rel=1e-6)
    assert log2[-1]["eval/held/accuracy"] == ev["accuracy"]
    assert log1[-1]["steps"] == 2 * 9  # ceil(513 / 64) steps per epoch, the last one of a single sample
    # importance on 289 ≡ 1 (mod 32) samples, read as a map (contiguous rank shares) and as a stream (rank 1's
    # share of the last batch is empty)
    for mode in ([], ["--streaming"]):
        imp = ["--data", f"{demo_dir}::limit=289", "--method", "fisher", "--device", "cpu", "--batch-size", "32"]
        i1, i2 = tmp_path / f"i1{len(mode)}.safetensors", tmp_path / f"i2{len(mode)}.safetensors"
        p1 = _torchrun(1, "importance", one, *imp, *mode, "-o", i1, "--json")
        assert p1.returncode == 0, p1.stderr
        p2 = _torchrun(2, "importance", one, *imp, *mode, "-o", i2, "--json")
        assert p2.returncode == 0, p2.stderr
        a, b2 = _weights(i1), _weights(i2)
        for k in a:
            torch.testing.assert_close(a[k], b2[k], rtol=1e-4, atol=1e-9)
        assert json.loads(p1.stdout)["samples"] == json.loads(p2.stdout)["samples"] == 289, p2.stdout


def test_grow_head(cli, anchored, tmp_path):

    from cl_tool.demo import make_dataset

    ds = make_dataset(200, classes=12, seed=3)
    path = tmp_path / "twelve"
    ds.save_to_disk(str(path))
    out = tmp_path / "g.safetensors"
    r = cli("train-next", anchored, "--data", path, "--device", "cpu", "-o", out)
    assert r.code == 4 and "--grow-head" in r.error_line and not out.exists()
    r = cli("train-next", anchored, "--data", path, "--device", "cpu", "--grow-head", "-o", out)
    assert r.code == 0, r.err
    from cl_tool.checkpoint import load_checkpoint

    old, new = load_checkpoint(anchored), load_checkpoint(out)
    assert new.spec.num_classes == 12
    w_old, w_new = old.state["net.3.weight"], new.state["net.3.weight"]
    assert w_new.shape[0] == 12 and w_old.shape[0] == 10


def test_log_json_and_eval_data(cli, anchored, demo_dir, tmp_path):
    log = tmp_path / "log.jsonl"
    out = tmp_path / "o.safetensors"
    r = cli(
        "train-next",
        anchored,
        "--data",
        f"{demo_dir}::permute=4,limit=300",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--eval-data",
        f"old={demo_dir}::split=test",
        "--log-json",
        log,
        "--schedule",
        "cosine",
        "--warmup-steps",
        "3",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.01",
        "-o",
        out,
    )
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    for key in ("loss", "task_loss", "penalty", "lr", "samples_per_s", "eval/old/accuracy", "seconds", "setup_seconds"):
        assert key in lines[0]
    assert lines[1]["lr"] < lines[0]["lr"]  # cosine decays


def test_setup_and_training_time_are_reported_apart(anchored, demo_dir, tmp_path):
    """set-up (process start → first step: imports, model, data) and training (first step → last) are separate fields."""

    t0 = time.perf_counter()
    r = run_subprocess(
        "train-next",
        anchored,
        "--data",
        f"{demo_dir}::limit=256",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--penalty",
        "none",
        "-o",
        tmp_path / "o.safetensors",
        "--log-json",
        tmp_path / "log.jsonl",
        "--json",
    )
    wall = time.perf_counter() - t0
    assert r.code == 0, r.err
    res = json.loads(r.out)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert res["setup_seconds"] > 0 and res["train_seconds"] > 0 and res["setup_seconds"] + res["train_seconds"] < wall
    assert res["train_seconds"] == pytest.approx(sum(e["seconds"] for e in log), abs=2e-3)
    # train_seconds is rounded to 1 ms in the JSON: allow that rounding (and samples/s's 0.1) in samples = rate × time
    assert res["samples_per_s"] * res["train_seconds"] == pytest.approx(
        512, abs=res["samples_per_s"] * 5e-4 + 0.1 * res["train_seconds"] + 1e-6
    )
    assert all(e["setup_seconds"] == pytest.approx(res["setup_seconds"], abs=1e-3) for e in log)
    assert "s of training" in r.err and "s of set-up" in r.err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_penalty_in_fp32(cli, anchored, demo_dir, tmp_path, precision):
    out = tmp_path / f"{precision}.safetensors"
    r = cli(
        "train-next",
        anchored,
        "--data",
        f"{demo_dir}::limit=256,rotate=90",
        "--device",
        "cpu",
        "--precision",
        precision,
        "--lambda",
        "100",
        "-o",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["penalty"] == "stabilized" and res["epochs"][-1]["penalty"] > 0
    from safetensors.torch import load_file

    w = load_file(str(out))
    assert all(
        v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values()
    )  # weights stay fp32 under autocast


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_bn_stats_keeps_running_statistics(cli, demo_dir, tmp_path, freeze):
    """--freeze-bn-stats: BatchNorm running mean/var (and the batch counter) stay as in the anchor, while
    the BatchNorm affine parameters still train; without it the statistics follow the new data."""
    from cl_tool.checkpoint import load_checkpoint

    a0, a = tmp_path / "a0.safetensors", tmp_path / "a.safetensors"
    assert cli("init", "--arch", "cnn", "--arch-arg", "widths=4,4,4", "-o", a0).code == 0
    argv = ["train-next", a0, "--data", f"{demo_dir}::limit=128", "--penalty", "none", "--device", "cpu", "-o", a]
    r = cli(*argv, *(["--freeze-bn-stats"] if freeze else []))
    assert r.code == 0, r.err
    before, after = load_checkpoint(a0), load_checkpoint(a)
    stats = [k for k in before.state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 9
    unchanged = [torch.equal(before.state[k], after.state[k]) for k in stats]
    if freeze:
        assert all(unchanged)
    else:  # re-estimated after training (--bn-stats recompute): the counter is the pass's batches, 128 / 64
        assert not any(u for k, u in zip(stats, unchanged) if not k.endswith("num_batches_tracked"))
        assert all(int(after.state[k]) == 2 for k in stats if k.endswith("num_batches_tracked"))
    bn_weights = [k for k in before.state if k.startswith("features.1.") and k.endswith(("weight", "bias"))]
    assert bn_weights and not any(torch.equal(before.state[k], after.state[k]) for k in bn_weights)
    assert after.history[-1].get("freeze_bn_stats") is (True if freeze else None)
    assert after.history[-1]["bn_stats"]["method"] == ("frozen" if freeze else "recomputed")


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_plain_step_is_the_optimizers_own_update(name):
    """make_optimizer's step skips torch's wrappers (and the torch._dynamo import) but updates exactly as Optimizer.step."""
    import copy

    from cl_tool.training import TrainConfig, make_optimizer

    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = copy.deepcopy(ref_model)
    cfg = TrainConfig(
        optimizer=name, lr=0.05, momentum=0.9 if name == "sgd" else 0.0, nesterov=name == "sgd", weight_decay=0.01
    )
    reference = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](
        ref_model.parameters(),
        lr=0.05,
        weight_decay=0.01,
        **({"momentum": 0.9, "nesterov": True} if name == "sgd" else {}),
    )
    opt = make_optimizer(cfg, list(model.parameters()))
    x = torch.randn(8, 5)
    for _ in range(4):
        for m, o in ((ref_model, reference), (model, opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_keep_freed_memory_is_set_once_and_respects_the_users_malloc_variables(monkeypatch):
    import platform
    import sys

    from cl_tool.runtime import keep_freed_memory

    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_freed_memory() is False  # the user's own setting wins
