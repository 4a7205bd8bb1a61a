"""prune --by fisher/mas on data computes the method with its options (--fisher-labels, --mas-output), as
`cl-tool importance` does with the same options; a stored sidecar of other options is refused."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fisher_sidecars(tmp_path_factory, small_mlp, demo_dir):
    """The small MLP's Fisher sidecars on 64 training samples, one per label mode."""
    from cl_tool.cli import main

    d = tmp_path_factory.mktemp("fisher")
    paths = {}
    for mode in ("empirical", "sampled", "exact"):
        paths[mode] = d / f"{mode}.importance.safetensors"
        argv = ["importance", small_mlp, "--method", "fisher", "--fisher-labels", mode, "-o", paths[mode]]
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in [*argv, "--data", f"{demo_dir}::limit=64", "--device", "cpu"]])
        assert exc.value.code == 0
    return paths


def test_prune_on_data_computes_the_asked_fisher_labels(cli, small_mlp, fisher_sidecars, demo_dir, tmp_path):
    """Each label mode on data prunes as the stored sidecar of that mode does, and the modes prune differently."""
    from safetensors.torch import load_file

    common = ["--sparsity", "0.7", "--rank", "raw", "--device", "cpu"]
    pruned = {}
    for mode in ("empirical", "sampled", "exact"):
        on_data, stored = tmp_path / f"d_{mode}.safetensors", tmp_path / f"s_{mode}.safetensors"
        r = cli("prune", small_mlp, "--by", "fisher", "--fisher-labels", mode, "--score-data",
                f"{demo_dir}::limit=64", *common, "-o", on_data, "--json")  # fmt: skip
        assert r.code == 0, r.err
        assert json.loads(r.out)["source"]["fisher_labels"] == mode
        r = cli("prune", small_mlp, "--by", "fisher", "--importance", fisher_sidecars[mode], *common, "-o", stored)
        assert r.code == 0, r.err
        pruned[mode], from_sidecar = load_file(on_data), load_file(stored)
        assert all(torch.equal(pruned[mode][n], from_sidecar[n]) for n in pruned[mode])
    w = "net.1.weight"
    assert not torch.equal(pruned["empirical"][w], pruned["exact"][w])
    assert not torch.equal(pruned["sampled"][w], pruned["exact"][w])


def test_prune_refuses_a_fisher_sidecar_of_other_labels(cli, small_mlp, fisher_sidecars, tmp_path):
    out = tmp_path / "p.safetensors"
    common = ["--importance", fisher_sidecars["exact"], "--sparsity", "0.5", "-o", out]
    r = cli("prune", small_mlp, "--by", "fisher", "--fisher-labels", "empirical", *common)
    assert r.code == 4 and "--fisher-labels empirical" in r.error_line and "exact" in r.error_line, r.err
    assert not out.exists()
    r = cli("prune", small_mlp, "--by", "importance", "--fisher-labels", "exact", *common)
    assert r.code == 0, r.err


def test_prune_notes_a_method_option_that_does_not_apply(cli, small_mlp, tmp_path):
    r = cli(
        "prune",
        small_mlp,
        "--by",
        "magnitude",
        "--mas-output",
        "softmax",
        "-s",
        "0.5",
        "-o",
        tmp_path / "m.safetensors",
    )
    assert r.code == 0 and "ignores --mas-output" in r.err, r.err
