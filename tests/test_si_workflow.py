"""SI collected by train-next --si-out feeds the next train-next like any other sidecar."""

import json

import pytest


def test_si_sidecar_feeds_next_task(cli, demo_dir, tmp_path):
    a0, a, b = tmp_path / "a0.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    si = tmp_path / "a.importance.safetensors"  # the default sidecar name beside a.safetensors
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "-o", a0).code == 0
    r = cli(
        "train-next",
        a0,
        "--data",
        f"{demo_dir}::limit=600",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--si-out",
        si,
        "-o",
        a,
        "--json",
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["si_out"] == str(si)
    from cl_tool.checkpoint import load_checkpoint
    from cl_tool.sidecar import load_sidecar

    sc = load_sidecar(si)
    assert sc.method == "si" and sc.options["xi"] == pytest.approx(0.1)
    assert sc.fingerprint == load_checkpoint(a).fingerprint  # belongs to the checkpoint it was trained into
    assert all(float(t.sum()) > 0 for t in sc.tensors.values())
    r = cli(
        "train-next",
        a,
        "--data",
        f"{demo_dir}::limit=600,rotate=90",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--lambda",
        "100",
        "-o",
        b,
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["penalty"] == "stabilized" and res["importance"] == str(si)
    assert res["epochs"][-1]["penalty"] > 0


def test_importance_method_si_explains(cli, small_mlp, demo_dir):
    r = cli("importance", small_mlp, "--data", demo_dir, "--method", "si")
    assert r.code == 2 and "--si-out" in r.error_line
