"""Fitting the shell: a mistyped data name fails at once, the decoded cache's housekeeping, choosing λ in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir


def test_a_mistyped_data_name_fails_at_once_without_the_hub(cli, small_mlp, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub cannot be reached
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the datasets library was asked"))
    r = cli("evaluate", small_mlp, "--data", "mnist_pngz", "--device", "cpu")
    assert r.code == 7 and r.err.splitlines() == [r.error_line]  # one sentence, no retry lines
    assert "--data mnist_pngz is not a local file or folder" in r.error_line
    assert "http://127.0.0.1:9" in r.error_line
    r = cli("evaluate", small_mlp, "--data", "./mnist_pngz", "--device", "cpu")  # looks like a path
    assert r.code == 3 and "does not exist; check the path" in r.error_line


def test_offline_mode_asks_only_the_local_copy(cli, small_mlp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = cli("evaluate", small_mlp, "--data", "mnist_pngz", "--device", "cpu")
    assert r.code == 7 and r.err.splitlines() == [r.error_line]
    assert "Hugging Face Hub cannot be reached" in r.error_line


def _cached(cli, ckpt, data, folder):
    r = cli("evaluate", ckpt, "--data", data, "--device", "cpu", "--cache-dir", folder)
    assert r.code == 0, r.err


def test_cache_lists_clears_by_age_and_evicts_the_least_recently_used(cli, small_mlp, demo_dir, tmp_path, monkeypatch):
    import os
    import time

    folder = tmp_path / "cache"
    monkeypatch.setenv("CL_TOOL_CACHE", str(folder))
    for n in (40, 60):
        _cached(cli, small_mlp, f"{demo_dir}::limit={n}", folder)
    r = cli("cache", "--json")
    listing = json.loads(r.out)
    assert r.code == 0 and listing["folder"] == str(folder) and len(listing["files"]) == 2
    assert sorted(f["rows"] for f in listing["files"]) == [40, 60]
    assert {f["source"] for f in listing["files"]} == {str(demo_dir.resolve())}
    sizes = {f["rows"]: f["bytes"] for f in listing["files"]}
    assert listing["total_bytes"] == sum(sizes.values()) == sum(p.stat().st_size for p in folder.glob("*.cltd"))
    human = cli("cache")
    assert str(demo_dir.resolve()) in human.out and "total: 2 file(s)" in human.out  # the result: stdout

    by_rows = {f["rows"]: folder / f["file"] for f in listing["files"]}
    old = time.time() - 10 * 86400
    os.utime(by_rows[40], (old, old))  # last used ten days ago
    r = cli("cache", "--older-than", "7d", "--json")
    assert [f["rows"] for f in json.loads(r.out)["files"]] == [40] and by_rows[40].exists()  # listing removes nothing
    _cached(cli, small_mlp, f"{demo_dir}::limit=60", folder)  # a hit marks the file used now
    assert time.time() - by_rows[60].stat().st_mtime < 3600
    r = cli("cache", "--clear", "--older-than", "7d", "--json")
    assert [f["rows"] for f in json.loads(r.out)["removed"]] == [40]
    assert not by_rows[40].exists() and by_rows[60].exists()

    # the cap: writing a third file leaves room for it and one more; the least recently used one goes
    _cached(cli, small_mlp, f"{demo_dir}::limit=40", folder)
    os.utime(by_rows[60], (old, old))
    monkeypatch.setenv("CL_TOOL_CACHE_MAX", str(sizes[40] + sizes[60] + 1000))
    _cached(cli, small_mlp, f"{demo_dir}::limit=50", folder)
    rows = sorted(f["rows"] for f in json.loads(cli("cache", "--json").out)["files"])
    assert rows == [40, 50] and not by_rows[60].exists()
    r = cli("cache", "--max", "1", "--json")  # trim now, down to one byte: nothing stays
    assert len(json.loads(r.out)["removed"]) == 2 and not list(folder.glob("*.cltd"))
    r = cli("cache", "--clear", "--older-than", "soon")
    assert r.code == 2 and "--older-than 'soon' is not a duration" in r.error_line


def test_small_inputs_get_whole_image_defaults_and_info_shows_the_data_config(cli, tmp_path):
    from cl_tool.data.transforms import Augment, small_input_augment

    small = tmp_path / "r28.safetensors"
    r = cli("init", "--arch", "resnet10t", "--input-shape", "1x28x28", "--num-classes", "10", "-o", small)
    assert r.code == 0 and "crop_pct 1.0 is recorded instead of timm's 0.875" in r.err
    r = cli("info", small)
    assert "timm data config: input 1x28x28, interpolation bicubic, crop_pct 1.0 (center)" in r.out
    assert "note:" not in r.out
    (info,) = json.loads(cli("info", small, "--json").out)
    assert info["model"]["data_config"]["crop_pct"] == 1.0
    big = tmp_path / "r96.safetensors"
    assert cli("init", "--arch", "resnet10t", "--input-shape", "3x96x96", "--num-classes", "10", "-o", big).code == 0
    (info,) = json.loads(cli("info", big, "--json").out)
    assert info["model"]["data_config"]["crop_pct"] == 0.875  # photo-sized inputs keep timm's own

    aug, note = small_input_augment(Augment("timm", args={"hflip": 0.0}), (1, 28, 28))
    assert aug.args == {"hflip": 0.0, "scale": (0.8, 1.0)} and "scale 0.8-1" in note
    given = Augment("timm", args={"scale": (0.08, 1.0)})
    assert small_input_augment(given, (1, 28, 28)) == (given, None)  # a given scale is kept
    assert small_input_augment(Augment("timm"), (3, 96, 96)) == (Augment("timm"), None)
    assert small_input_augment(Augment("shift", shift=2), (1, 28, 28)) == (Augment("shift", shift=2), None)


def test_info_json_carries_full_history_entries(cli, small_mlp):
    (info,) = json.loads(cli("info", small_mlp, "--json").out)
    entry = info["history"][-1]["entry"]
    assert entry["command"] == "train-next" and entry["epochs"] == 1 and entry["lr"] > 0
    assert info["history"][-1]["command"] == "train-next" and "extra" in info


def test_a_lambda_list_trains_one_model_per_lambda_from_one_anchor(cli, anchored, demo_dir, tmp_path):
    from cl_tool.checkpoint import load_checkpoint

    train = ["--data", f"B={demo_dir}::limit=200,permute=1", "--device", "cpu", "--deterministic", "--seed", "1"]
    evals = [
        "--eval-data",
        f"A={demo_dir}::split=test,limit=200",
        "--eval-data",
        f"B={demo_dir}::split=test,limit=200,permute=1",
    ]
    out = tmp_path / "b.safetensors"
    r = cli("train-next", anchored, *train, *evals, "--lambda", "0,10,1e6", "-o", out, "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert [run["lambda"] for run in res["runs"]] == [0, 10, 1e6]
    paths = [tmp_path / f"b.lambda-{s}.safetensors" for s in ("0", "10", "1e06")]
    assert [run["output"] for run in res["runs"]] == [str(p) for p in paths] and not out.exists()
    for run in res["runs"]:
        assert set(run["accuracy"]) == {"A", "B"}
        assert run["mean"] == pytest.approx((run["accuracy"]["A"] + run["accuracy"]["B"]) / 2)
    best = max(res["runs"], key=lambda run: run["mean"])
    assert res["best"]["lambda"] == best["lambda"] and res["best"]["criterion"] == "mean eval accuracy"
    # a huge λ holds the weights at the anchor: task A keeps more than without the penalty
    assert res["runs"][2]["accuracy"]["A"] > res["runs"][0]["accuracy"]["A"]
    # each output is exactly what the command with that one λ writes
    single = tmp_path / "single.safetensors"
    assert cli("train-next", anchored, *train, *evals, "--lambda", "10", "-o", single).code == 0
    assert load_checkpoint(single).fingerprint == load_checkpoint(paths[1]).fingerprint == res["runs"][1]["fingerprint"]
    human = cli("train-next", anchored, *train, *evals, "--lambda", "0,10", "-o", out, "--force")
    assert human.code == 0 and "eval accuracy after training, per λ" in human.out and "(best)" in human.out
    r = cli("train-next", anchored, *train, "--lambda", "0,10", "-o", tmp_path / "c.safetensors")
    assert r.code == 2 and "need --eval-data" in r.error_line and not list(tmp_path.glob("c.*"))


def _sweep_argv(anchored, demo_dir, tmp_path, lambdas: str, *extra):
    return [
        "train-next",
        anchored,
        "--data",
        f"B={demo_dir}::limit=64,permute=1",
        "--eval-data",
        f"A={demo_dir}::split=test,limit=64",
        "--eval-data",
        f"B={demo_dir}::split=test,limit=64,permute=1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--lambda",
        lambdas,
        "-o",
        tmp_path / "b.safetensors",
        *extra,
    ]


def _spy_on_writes(monkeypatch) -> list[str]:
    """The paths train-next's checkpoints were written to (each output is then in place until the command ends)."""
    import cl_tool.checkpoint as checkpoint

    written, real = [], checkpoint.save_checkpoint

    def save(path, *a, **k):
        fp = real(path, *a, **k)
        written.append(Path(path).name)
        return fp

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    return written


def _plot_option(path: Path) -> list:
    """``--plot PATH`` where matplotlib (optional) is installed, else nothing."""
    import importlib.util

    return ["--plot", path] if importlib.util.find_spec("matplotlib") else []


def test_the_lambda_plot_draws_the_table_and_follows_the_file_rules(cli, anchored, demo_dir, tmp_path, monkeypatch):
    import sys

    pytest.importorskip("matplotlib")
    import cl_tool.plots as plots

    drawn, real = [], plots.plot_lambda_sweep
    monkeypatch.setattr(plots, "plot_lambda_sweep", lambda *a, **k: (drawn.append(a), real(*a, **k)))
    plot = tmp_path / "sweep.png"
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "0,1e4", "--plot", plot, "--json"))
    assert r.code == 0, r.err
    res = json.loads(r.out)
    (args,) = drawn  # the plot shows exactly the table's numbers
    assert args[0] == [0, 1e4] and args[2] == plot
    assert args[1] == {n: [run["accuracy"][n] for run in res["runs"]] for n in ("A", "B")}
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["b.lambda-0.safetensors", "b.lambda-10000.safetensors", "sweep.png"]

    # all refused before any training, leaving every file as it was
    before = snapshot_dir(tmp_path)
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "1,2", "--plot", plot))  # only the plot exists
    assert r.code == 6 and "--plot" in r.error_line and "already exists" in r.error_line and "--force" in r.error_line
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "1,2", "--plot", anchored, "--force"))
    assert r.code == 6 and "--plot" in r.error_line and "also an input" in r.error_line, r.err
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "1,2", "--plot", tmp_path / "b.lambda-2.safetensors"))
    assert r.code == 6 and "both name" in r.error_line, r.err
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "1", "--plot", tmp_path / "one.png"))
    assert r.code == 2 and "several --lambda values" in r.error_line, r.err
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "0.1,0.10000001"))  # distinct λ, distinct names
    assert r.code == 0, r.err
    assert {"b.lambda-0.1.safetensors", "b.lambda-0.10000001.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    for name in ("b.lambda-0.1.safetensors", "b.lambda-0.10000001.safetensors"):
        (tmp_path / name).unlink()
    assert snapshot_dir(tmp_path) == before
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "1,2", "--plot", tmp_path / "new.png"))
    assert r.code == 7 and "pip install 'cl-tool[plot]'" in r.error_line, r.err
    assert snapshot_dir(tmp_path) == before  # exit 7 before training: no λ output either


def test_a_diverging_lambda_leaves_none_of_the_outputs(cli, anchored, demo_dir, tmp_path, monkeypatch):
    """λ = 1 trains and is written; λ = 10⁶ under plain EWC with SGD diverges: exit 5, and the λ = 1 output is removed."""
    written = _spy_on_writes(monkeypatch)
    before, anchor_dir = snapshot_dir(tmp_path), snapshot_dir(anchored.parent)
    extra = ["--penalty", "ewc", "--optimizer", "sgd", "--lr", "0.5", *_plot_option(tmp_path / "sweep.png")]
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "1,1e6", *extra))
    assert r.code == 5 and "diverged" in r.error_line and "Traceback" not in r.err, r.err
    assert written == ["b.lambda-1.safetensors"]  # the first λ was in place before the second failed
    assert snapshot_dir(tmp_path) == before  # no λ output, no plot, no temporary file
    assert snapshot_dir(anchored.parent) == anchor_dir


def test_an_interruption_between_lambdas_leaves_none_of_the_outputs(cli, anchored, demo_dir, tmp_path, monkeypatch):
    import os
    import signal

    import cl_tool.runtime as runtime

    written = _spy_on_writes(monkeypatch)
    calls, real = [], runtime.seed_everything

    def seed_everything(seed):  # called at the start of each λ's run
        calls.append(seed)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real(seed)

    monkeypatch.setattr(runtime, "seed_everything", seed_everything)
    before = snapshot_dir(tmp_path)
    r = cli(*_sweep_argv(anchored, demo_dir, tmp_path, "0,10", *_plot_option(tmp_path / "sweep.png")))
    assert r.code == 130, r.err
    assert written == ["b.lambda-0.safetensors"] and len(calls) == 2
    assert snapshot_dir(tmp_path) == before


def test_eval_tasks_need_their_own_names(cli, small_mlp, demo_dir, tmp_path):
    """Two --eval-data tasks named alike would share one column of figures: refused (exit 2) before training."""
    base = ["train-next", small_mlp, "--data", f"{demo_dir}::limit=64", "--epochs", "1", "--penalty", "none"]
    same = ["--eval-data", f"{demo_dir}::limit=32", "--eval-data", f"{demo_dir}::limit=32,permute=1"]
    for extra in ([], ["--lambda", "1,10", "--penalty", "ewc"]):
        r = cli(*base, *same, *extra, "-o", tmp_path / "o.safetensors")
        assert r.code == 2 and "named demo" in r.error_line and "A=PATH" in r.error_line, r.err
        assert not list(tmp_path.glob("o*"))
    named = ["--eval-data", f"A={demo_dir}::limit=32", "--eval-data", f"B={demo_dir}::limit=32,permute=1"]
    r = cli(*base, *named, "--workers", "0", "-o", tmp_path / "o.safetensors", "--json")
    assert r.code == 0, r.err
    assert [e["on"] for e in json.loads(r.out)["final_eval"]] == ["A", "B"]
