"""The whole workflow through the real CLI: init → train A → importance → train B (stabilized vs none) → evaluate → prune."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, demo_dir):
    from cl_tool.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as exc:
            main([str(x) for x in argv])
        assert exc.value.code == 0, argv

    d = tmp_path_factory.mktemp("e2e")
    a0, a, b_st, b_none = (d / n for n in ("a0.safetensors", "a.safetensors", "b_st.safetensors", "b_none.safetensors"))
    task_a = f"A={demo_dir}::split=train"
    task_b = f"B={demo_dir}::split=train,rotate=90"
    run("init", "--arch", "mlp", "--arch-arg", "sizes=784,100,10", "--input-shape", "1x28x28", "-o", a0)
    run("train-next", a0, "--data", task_a, "--epochs", "3", "--device", "cpu", "-o", a)
    run("importance", a, "--data", task_a, "--method", "fisher", "--device", "cpu")
    common = ["--data", task_b, "--epochs", "4", "--device", "cpu", "--lr", "1e-3"]
    run("train-next", a, *common, "--lambda", "1000", "-o", b_st)
    run("train-next", a, *common, "--penalty", "none", "-o", b_none)
    return d, a, b_st, b_none


def test_stabilized_keeps_task_a_better_than_none(cli, workflow, demo_dir):
    d, a, b_st, b_none = workflow
    assert (d / "a.importance.safetensors").exists()
    r = cli(
        "evaluate",
        a,
        b_st,
        b_none,
        "--data",
        f"A={demo_dir}::split=test",
        "--data",
        f"B={demo_dir}::split=test,rotate=90",
        "--device",
        "cpu",
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["tasks"] == ["A", "B"]
    acc = res["accuracy"]
    a_after_a, a_after_st, a_after_none = acc[0][0], acc[1][0], acc[2][0]
    b_after_st, b_after_none = acc[1][1], acc[2][1]
    print(
        "A after A",
        a_after_a,
        "A after B (stabilized)",
        a_after_st,
        "A after B (none)",
        a_after_none,
        "B (stabilized)",
        b_after_st,
        "B (none)",
        b_after_none,
    )
    assert a_after_a > 0.8  # task A was learned
    assert b_after_none > 0.5 and b_after_st > 0.3  # both learned task B (chance: 0.1)
    assert a_after_st > a_after_none + 0.1  # the penalty clearly reduced forgetting


def test_history_records_the_penalty(workflow):
    from cl_tool.checkpoint import load_checkpoint

    _, a, b_st, b_none = workflow
    h = load_checkpoint(b_st).history
    assert [e["command"] for e in h] == ["init", "train-next", "train-next"]
    assert h[-1]["penalty"] == "stabilized" and h[-1]["lambda"] == 1000 and h[-1]["epochs"] == 4
    assert h[-1]["data"]["transforms"]["rotate"] == 90
    assert load_checkpoint(b_none).history[-1]["penalty"] == "none"


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_reaches_requested_sparsity(cli, workflow, tmp_path, scope):
    d, a, b_st, _ = workflow
    out = tmp_path / f"p_{scope}.safetensors"
    # b_st has no sidecar of its own: prune by magnitude, and by a's importance after computing b's
    r = cli("prune", b_st, "--by", "magnitude", "--sparsity", "0.9", "--scope", scope, "-o", out, "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    from safetensors.torch import load_file

    w = load_file(str(out))
    pruned_names = list(res["per_layer"])
    assert pruned_names and all(n.endswith("weight") for n in pruned_names)
    zeros = sum(int((w[n] == 0).sum()) for n in pruned_names)
    total = sum(w[n].numel() for n in pruned_names)
    assert abs(zeros / total - 0.9) < 0.005
    if scope == "layer":
        for n in pruned_names:
            assert abs(float((w[n] == 0).float().mean()) - 0.9) < 0.005
    for n in w:
        if n.endswith("bias"):
            assert torch.count_nonzero(w[n]) > 0  # biases untouched by default


def test_prune_by_importance_sidecar(cli, workflow, tmp_path):
    d, a, _, _ = workflow
    out = tmp_path / "a90.safetensors"
    r = cli("prune", a, "--by", "importance", "--sparsity", "0.9", "-o", out, "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["source"]["method"] == "fisher"
    assert abs(res["achieved_sparsity"] - 0.9) < 0.005


def test_importance_deterministic_gives_the_same_sums_and_restores_torch(cli, workflow, demo_dir, tmp_path):
    """``--deterministic`` turns torch's deterministic algorithms on for the run only (and with them one
    thread count for every batch); ``--debug`` logs the batches by thread count."""
    from safetensors.torch import load_file

    _, a, _, _ = workflow
    task_a = f"A={demo_dir}::split=train"
    plain, det = tmp_path / "plain.safetensors", tmp_path / "det.safetensors"
    assert cli("importance", a, "--data", task_a, "--device", "cpu", "-o", plain).code == 0
    r = cli("--debug", "importance", a, "--data", task_a, "--device", "cpu", "--deterministic", "-o", det)
    assert r.code == 0, r.err
    assert not torch.are_deterministic_algorithms_enabled()
    assert "importance batches by torch threads:" in r.err
    x, y = load_file(plain), load_file(det)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
