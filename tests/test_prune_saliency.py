"""prune --rank saliency: rank an importance Ω by Ω·w² (Optimal Brain Damage) instead of Ω."""

from __future__ import annotations

import json

import pytest
import torch

from cl_tool.workflows.prune import saliency


def test_saliency_is_omega_times_w_squared_and_reorders_a_tiny_tensor():
    """Ω = [4, 1, 2, 8], w = [0.1, 3, -1, 0.5]: Ω·w² = [0.04, 9, 2, 2]; at 50 % raw Ω prunes indices 1, 2,
    saliency prunes 0 and then the tie 2 = 2 at the lower index (2)."""
    from cl_tool.pruning import global_masks

    omega = {"w": torch.tensor([4.0, 1.0, 2.0, 8.0])}
    weights = {"w": torch.tensor([0.1, 3.0, -1.0, 0.5])}
    s = saliency(omega, weights)
    torch.testing.assert_close(s["w"], torch.tensor([0.04, 9.0, 2.0, 2.0]))
    assert global_masks(omega, 0.5)["w"].tolist() == [True, False, False, True]
    assert global_masks(s, 0.5)["w"].tolist() == [False, True, False, True]


@pytest.fixture(scope="module")
def fisher_sidecar(tmp_path_factory, small_mlp, demo_dir):
    from cl_tool.cli import main

    side = tmp_path_factory.mktemp("fs") / "f.importance.safetensors"
    argv = ["importance", small_mlp, "--method", "fisher", "--data", f"{demo_dir}::limit=64", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in [*argv, "-o", side]])
    assert exc.value.code == 0
    return side


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_cli_saliency_prunes_the_lowest_omega_w2(cli, small_mlp, fisher_sidecar, demo_dir, tmp_path, scope):
    """The pruned checkpoint (the streaming path) zeroes exactly the masks global/layer scope gives for Ω·w² from the
    sidecar, which differ from raw Ω's; the record says so; saliency is the default (auto) and --rank raw the paper's;
    the in-memory sweep ranks the same way (its accuracy at 0.6 is the streamed checkpoint's)."""
    from safetensors.torch import load_file

    from cl_tool.pruning import global_masks, layer_masks
    from cl_tool.sidecar import load_sidecar

    common = ["--by", "fisher", "--importance", fisher_sidecar, "--scope", scope, "--sparsity", "0.6", "--json"]
    sal, raw = tmp_path / "s.safetensors", tmp_path / "r.safetensors"
    r = cli("prune", small_mlp, *common, "-o", sal)
    assert r.code == 0, r.err
    assert json.loads(r.out)["source"]["rank"] == "saliency"
    r = cli("prune", small_mlp, *common, "--rank", "raw", "-o", raw)
    assert r.code == 0, r.err
    assert "rank" not in json.loads(r.out)["source"]
    w, omega = load_file(small_mlp), load_sidecar(fisher_sidecar).tensors
    chosen = ["net.1.weight"]  # the classifier and biases are not selected by default
    masks = (global_masks if scope == "global" else layer_masks)({n: omega[n] * w[n] ** 2 for n in chosen}, 0.6)
    got_sal, got_raw = load_file(sal), load_file(raw)
    for n in chosen:
        assert torch.equal(got_sal[n], torch.where(masks[n], w[n], torch.zeros_like(w[n])))
    assert not torch.equal(got_sal["net.1.weight"], got_raw["net.1.weight"])
    test = f"{demo_dir}::split=test,limit=200"
    sweep = cli("prune", small_mlp, *common[:6], "--sweep", "0.6", "--data", test, "--json")
    assert sweep.code == 0, sweep.err
    ev = json.loads(cli("evaluate", sal, "--data", test, "--json").out)
    assert json.loads(sweep.out)["curves"]["fisher"][0]["accuracy"] == ev["accuracy"][0][0]


def test_saliency_of_a_signal_sidecar_is_refused(cli, small_mlp, demo_dir, tmp_path):
    side, out = tmp_path / "s.importance.safetensors", tmp_path / "p.safetensors"
    r = cli("importance", small_mlp, "--method", "signal", "--data", f"{demo_dir}::limit=32", "--device", "cpu",
            "-o", side)  # fmt: skip
    assert r.code == 0, r.err
    r = cli(
        "prune", small_mlp, "--by", "importance", "--importance", side, "--rank", "saliency", "-s", "0.5", "-o", out
    )
    assert r.code == 4 and "--rank saliency" in r.error_line and "signal" in r.error_line, r.err
    assert not out.exists()
    r = cli("prune", small_mlp, "--by", "magnitude", "--rank", "saliency", "-s", "0.5", "-o", out)
    assert r.code == 0 and "--rank" in r.err and "ignore" in r.err
