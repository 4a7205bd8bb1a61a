"""prune by |w| or stored scores streams the checkpoint file tensor by tensor (no torch): same result as in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cl_tool.checkpoint import load_checkpoint
from cl_tool.pruning import apply_masks, global_masks, layer_masks, select_prunable


@pytest.fixture(autouse=True, params=["whole-tensors", "pieces"])
def piece_bytes(request, monkeypatch):
    """Each test twice: tensors read whole (they are small), and in pieces of 24 bytes (6 float32, 12 bfloat16
    elements), so ties, masks, the fingerprint and a grown head's padding all cross piece boundaries."""
    import cl_tool.prune_stream

    if request.param == "pieces":
        monkeypatch.setattr(cl_tool.prune_stream, "PIECE_BYTES", 24)
    return request.param


def _expected(path, scores_of, sparsity, scope, **select):
    """The pruned state and masks computed in memory with torch (the reference path)."""
    ckpt = load_checkpoint(path)
    params = {n: ckpt.state[n] for n in ckpt.layout["parameters"]}
    chosen = select_prunable(params, classifier_names=tuple(ckpt.layout["classifier"]), **select)
    masks = (global_masks if scope == "global" else layer_masks)({n: scores_of(n, params[n]) for n in chosen}, sparsity)
    state = {k: v.clone() for k, v in ckpt.state.items()}
    apply_masks(state, masks)
    return state, masks


@pytest.fixture
def cnn(cli, tmp_path):
    """A paper CNN (conv, BatchNorm with integer buffers, linear) stored in bfloat16 for some tensors: mixed dtypes."""
    from cl_tool.checkpoint import save_checkpoint

    path = tmp_path / "c0.safetensors"
    assert cli("init", "--arch", "cnn", "--arch-arg", "widths=8,8,8", "-o", path).code == 0
    ckpt = load_checkpoint(path)
    state = dict(ckpt.state)
    state["features.0.weight"] = state["features.0.weight"].to(torch.bfloat16)
    state["classifier.weight"] = state["classifier.weight"].half()
    state["features.4.weight"][0, 0] = state["features.4.weight"][0, 1]  # a tie
    mixed = tmp_path / "c.safetensors"
    save_checkpoint(mixed, ckpt.spec, state, ckpt.history, layout=ckpt.layout)
    return mixed


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_equals_the_in_memory_path(cli, cnn, tmp_path, scope):
    out, mask = tmp_path / "p.safetensors", tmp_path / "p.mask.safetensors"
    r = cli(
        "prune",
        cnn,
        "--by",
        "magnitude",
        "--scope",
        scope,
        "--sparsity",
        "0.7",
        "--include-bias",
        "--include-classifier",
        "-o",
        out,
        "--mask-out",
        mask,
        "--json",
    )
    assert r.code == 0, r.err
    state, masks = _expected(cnn, lambda n, p: p.abs().float(), 0.7, scope, include_bias=True, include_classifier=True)
    pruned = load_checkpoint(out)  # recomputes the fingerprint from the tensors and validates them
    assert json.loads(r.out)["fingerprint"] == pruned.fingerprint
    for name, tensor in state.items():
        assert pruned.state[name].dtype == tensor.dtype and torch.equal(pruned.state[name], tensor), name
    from safetensors.torch import load_file

    stored = load_file(str(mask))
    assert stored.keys() == masks.keys() and all(torch.equal(stored[n], masks[n].to(torch.uint8)) for n in masks)
    assert (
        pruned.history[-1]["command"] == "prune"
        and pruned.extra["pruning"]["achieved_sparsity"] == json.loads(r.out)["achieved_sparsity"]
    )


@pytest.mark.parametrize("rank", ["raw", "saliency"])
def test_stored_scores_equal_the_in_memory_path(cli, demo_dir, tmp_path, rank):
    """Ω (raw) or Ω·w² (saliency, the default for a Fisher sidecar) streamed: the masks torch computes in memory."""
    a0, a = tmp_path / "a0.safetensors", tmp_path / "a.safetensors"
    data = f"{demo_dir}::limit=64"
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "-o", a0).code == 0
    assert cli("train-next", a0, "--data", data, "--device", "cpu", "-o", a).code == 0
    assert cli("importance", a, "--data", data, "--method", "fisher", "--device", "cpu").code == 0
    out = tmp_path / "p.safetensors"
    rank_opt = ["--rank", "raw"] if rank == "raw" else []
    assert cli("prune", a, "--by", "importance", *rank_opt, "--sparsity", "0.8", "-o", out).code == 0
    from cl_tool.sidecar import load_sidecar

    omega = load_sidecar(tmp_path / "a.importance.safetensors").tensors
    score = (lambda n, p: omega[n]) if rank == "raw" else (lambda n, p: omega[n].float() * p.float().square())
    state, _ = _expected(a, score, 0.8, "global")
    pruned = load_checkpoint(out)
    assert all(torch.equal(pruned.state[n], state[n]) for n in state)


@pytest.mark.parametrize("method", ["magnitude", "fisher"])
def test_an_ancestors_scores_after_a_grown_head(cli, demo_dir, tmp_path, method):
    """New output rows of a grown head score 0 and go first, exactly as in memory (a Fisher sidecar as Ω·w²)."""

    from cl_tool.demo import make_dataset

    a0, a, b = tmp_path / "a0.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "-o", a0).code == 0
    assert cli("train-next", a0, "--data", f"{demo_dir}::limit=64", "--device", "cpu", "-o", a).code == 0
    data = ["--data", f"{demo_dir}::limit=64", "--device", "cpu"] if method == "fisher" else []
    assert cli("importance", a, "--method", method, *data).code == 0
    twelve = tmp_path / "twelve"
    make_dataset(48, classes=12, seed=3).save_to_disk(str(twelve))
    assert cli("train-next", a, "--data", twelve, "--grow-head", "--device", "cpu", "--lambda", "1", "-o", b).code == 0
    out = tmp_path / "p.safetensors"
    r = cli(
        "prune",
        b,
        "--by",
        "importance",
        "--importance",
        tmp_path / "a.importance.safetensors",
        "--include-classifier",
        "--include-bias",
        "--sparsity",
        "0.5",
        "-o",
        out,
    )
    assert r.code == 0, r.err
    from cl_tool.lineage import fit_rows
    from cl_tool.sidecar import load_sidecar

    ckpt_b = load_checkpoint(b)
    omega = fit_rows(
        load_sidecar(tmp_path / "a.importance.safetensors").tensors, ckpt_b.state, {"net.3.weight", "net.3.bias"}
    )
    score = (lambda n, p: omega[n]) if method == "magnitude" else (lambda n, p: omega[n].float() * p.float().square())
    state, _ = _expected(b, score, 0.5, "global", include_bias=True, include_classifier=True)
    pruned = load_checkpoint(out)
    assert all(torch.equal(pruned.state[n], state[n]) for n in state)
    assert pruned.state["net.3.weight"][10:].abs().sum() == 0  # the new rows had score 0


def test_the_streaming_path_imports_no_torch(cli, tmp_path, small_mlp):
    probe = (
        "import sys\nfrom cl_tool.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('TORCH=' + str('torch' in sys.modules), 'CODE=' + str(code))"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "prune",
            str(small_mlp),
            "--by",
            "magnitude",
            "--sparsity",
            "0.9",
            "-o",
            str(tmp_path / "p.safetensors"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "TORCH=False CODE=0" in proc.stdout, proc.stdout + proc.stderr
