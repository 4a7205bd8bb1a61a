"""Lineage (issue 12): prune and train-next accept the importance sidecar of a recorded ancestor, refuse others.

Family used below (tiny MLP, 64 samples, 1 epoch each):

    a0 ─ a ─┬─ b ─┬─ c            (c: train-next b --importance a.importance)
            │     └─ bp ─ d       (bp: prune b; d: train-next bp)
            ├─ s                  (sibling of b)
            └─ g                  (train-next a --grow-head, 12 classes)
    other                         (unrelated init)
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import snapshot_dir


def _run(argv):
    from cl_tool.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(x) for x in argv])
    assert exc.value.code == 0, argv


@pytest.fixture(scope="module")
def family(tmp_path_factory, demo_dir):
    import datasets

    from cl_tool.demo import make_dataset

    d = tmp_path_factory.mktemp("family")
    f = {k: d / f"{k}.safetensors" for k in ("a0", "a", "b", "c", "bp", "d", "s", "g", "other")}
    f["a_imp"], f["s_imp"], f["b_imp"], f["other_imp"] = (
        d / f"{k}.importance.safetensors" for k in ("a", "s", "b", "other")
    )
    twelve = d / "twelve"
    datasets.disable_progress_bars()
    make_dataset(64, seed=3, classes=12).save_to_disk(str(twelve))
    data = f"{demo_dir}::limit=64"
    common = ["--epochs", "1", "--batch-size", "32", "--device", "cpu"]
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "-o", f["a0"]],
        ["train-next", f["a0"], "--data", f"A={data}", *common, "-o", f["a"]],
        ["importance", f["a"], "--data", f"A={data}", "--method", "fisher", "--device", "cpu"],
        ["train-next", f["a"], "--data", f"B={data},permute=1", *common, "--lambda", "200", "-o", f["b"]],
        [
            "train-next",
            f["b"],
            "--data",
            f"C={data},permute=2",
            *common,
            "--importance",
            f["a_imp"],
            "--lambda",
            "200",
            "-o",
            f["c"],
            "--json",
        ],
        ["prune", f["b"], "--by", "magnitude", "--sparsity", "0.5", "-o", f["bp"]],
        ["train-next", f["bp"], "--data", f"D={data},permute=3", *common, "--penalty", "none", "-o", f["d"]],
        ["train-next", f["a"], "--data", f"S={data},rotate=90", *common, "--penalty", "none", "-o", f["s"]],
        ["importance", f["s"], "--method", "magnitude"],
        ["importance", f["b"], "--method", "magnitude"],
        ["train-next", f["a"], "--data", f"G={twelve}", *common, "--penalty", "none", "--grow-head", "-o", f["g"]],
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "--seed", "7", "-o", f["other"]],
        ["importance", f["other"], "--method", "magnitude"],
    ):
        _run(argv)
    return d, f


def _fp(path):
    from cl_tool.checkpoint import load_checkpoint

    return load_checkpoint(path).fingerprint


# ----------------------------------------------------------------------------- pure functions


def test_ancestry_is_read_from_the_history():
    from cl_tool.lineage import ancestor_fingerprints, ancestors, generations_back, grown_since

    history = [
        {"command": "init"},
        {"command": "train-next", "anchor_fingerprint": "f0"},
        {"command": "prune", "source_fingerprint": "f1"},
        "not an entry",
        {"command": "train-next", "anchor_fingerprint": "f3", "grown": ["head.weight", "head.bias"]},
    ]
    assert ancestor_fingerprints(history) == [(1, "f3"), (3, "f1"), (4, "f0")]
    assert [a.command for a in ancestors(history)] == ["train-next", "?", "prune", "train-next", "init"]
    assert generations_back("me", "me", history) == 0
    assert generations_back("f1", "me", history) == 3
    assert generations_back("elsewhere", "me", history) is None
    assert generations_back("f0", "me", []) is None
    assert grown_since(history, 0) == frozenset()
    assert grown_since(history, 1) == {"head.weight", "head.bias"}
    # an edited history with nonsense values is ignored, not a crash
    assert ancestor_fingerprints([{"anchor_fingerprint": 5}, {"source_fingerprint": ""}, None]) == []


def test_fit_rows_pads_only_grown_tensors():
    from cl_tool.lineage import fit_rows

    om = {"w": torch.ones(2, 3), "v": torch.ones(2)}
    params = {"w": torch.zeros(4, 3), "v": torch.zeros(3), "missing": torch.zeros(1)}
    out = fit_rows(om, params, {"w"})
    assert (
        out["w"].shape == (4, 3)
        and torch.equal(out["w"][2:], torch.zeros(2, 3))
        and torch.equal(out["w"][:2], torch.ones(2, 3))
    )
    assert out["v"].shape == (2,)  # not grown: left for the caller's shape check
    assert out["missing"] is None


def test_the_grown_rows_rule():
    """One rule for every reader: the same shape, or fewer rows along dim 0 of a tensor grown since."""
    from cl_tool.lineage import fit_problem, rows_fit

    assert rows_fit([4, 3], (4, 3), grown=False) and rows_fit((2, 3), [4, 3], grown=True)
    assert not rows_fit((2, 3), (4, 3), grown=False)  # not grown: a different shape does not fit
    assert not rows_fit((5, 3), (4, 3), grown=True)  # more rows than the tensor
    assert not rows_fit((2, 2), (4, 3), grown=True) and not rows_fit((), (4,), grown=True)
    stored = {"w": (2, 3), "b": (2,), "x": (7,)}
    assert fit_problem(stored, {"w": (4, 3), "b": (4,)}, {"w", "b"}) is None
    assert fit_problem(stored, {"w": (4, 3), "b": (4,)}, {"w"}) == ("b", [2], [4])
    assert fit_problem(stored, {"missing": (1,)}, ()) is None  # a missing entry is the name check's to refuse


# ----------------------------------------------------------------------------- prune by an ancestor's scores


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest scores, ties to lower indices (cl-tool's rule)."""
    flat = scores.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))[:k]
    m = torch.zeros(flat.numel(), dtype=torch.bool)
    m[order] = True
    return m.reshape(scores.shape)


@pytest.mark.parametrize("target,generations", [("b", 1), ("c", 2), ("bp", 2), ("d", 3)])
def test_prune_accepts_an_ancestors_sidecar(cli, family, tmp_path, target, generations):
    from safetensors.torch import load_file

    d, f = family
    out = tmp_path / "p.safetensors"
    r = cli(
        "prune", f[target], "--by", "importance", "--importance", f["a_imp"], "--rank", "raw", "--sparsity", "0.5",
        "-o", out, "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    gen_text = f"{generations} generation{'s' if generations > 1 else ''} back"
    note = [ln for ln in r.err.splitlines() if ln.startswith("Using the importances")]
    assert len(note) == 1 and str(f["a_imp"]) in note[0] and gen_text in note[0] and str(f["a"]) in note[0], r.err
    res = json.loads(r.out)
    assert res["source"]["sidecar"] == str(f["a_imp"])
    assert res["source"]["sidecar_fingerprint"] == _fp(f["a"])
    assert res["source"]["generations"] == generations
    from cl_tool.checkpoint import load_checkpoint

    pruned = load_checkpoint(out)
    last = pruned.history[-1]
    assert last["command"] == "prune" and last["importance"] == str(f["a_imp"])
    assert last["importance_fingerprint"] == _fp(f["a"]) and last["importance_generations"] == generations
    assert pruned.extra["pruning"]["source"]["generations"] == generations
    # the pruned weights are exactly those with the lowest stored scores of a
    omega = load_file(str(f["a_imp"]))["net.1.weight"]
    before = load_file(str(f[target]))["net.1.weight"]
    k = round(0.5 * omega.numel())
    expected = _lowest(omega, k) | (before == 0)
    assert torch.equal(pruned.state["net.1.weight"] == 0, expected)


def test_own_sidecar_needs_no_note(cli, family, tmp_path):
    d, f = family
    r = cli("prune", f["a"], "--by", "importance", "--sparsity", "0.5", "-o", tmp_path / "p.safetensors", "--json")
    assert r.code == 0, r.err
    assert "Using the importances" not in r.err
    assert json.loads(r.out)["source"]["generations"] == 0


@pytest.mark.parametrize(
    "target,sidecar,who",
    [
        ("b", "s_imp", "sibling"),
        ("b", "other_imp", "unrelated"),
        ("a", "b_imp", "descendant"),
        ("g", "s_imp", "sibling (grown head)"),
    ],
)
def test_prune_refuses_a_sidecar_outside_the_ancestry(cli, family, tmp_path, target, sidecar, who):
    d, f = family
    before, before_tmp = snapshot_dir(d), snapshot_dir(tmp_path)
    r = cli(
        "prune",
        f[target],
        "--by",
        "importance",
        "--importance",
        f[sidecar],
        "--sparsity",
        "0.5",
        "-o",
        tmp_path / "p.safetensors",
    )
    assert r.code == 4, f"{who}: {r.err}"
    assert (
        "belongs to another checkpoint" in r.error_line
        and str(f[sidecar]) in r.error_line
        and str(f[target]) in r.error_line
    )
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert snapshot_dir(d) == before and snapshot_dir(tmp_path) == before_tmp  # inputs unchanged, nothing written


def test_grown_head_rows_score_zero(cli, family, tmp_path):
    d, f = family
    out = tmp_path / "g.safetensors"
    r = cli(
        "prune",
        f["g"],
        "--by",
        "importance",
        "--importance",
        f["a_imp"],
        "--sparsity",
        "0.3",
        "--include-classifier",
        "--scope",
        "layer",
        "-o",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["source"]["generations"] == 1
    from cl_tool.checkpoint import load_checkpoint

    head = load_checkpoint(out).state["net.3.weight"]
    assert head.shape[0] == 12
    assert torch.all(head[10:] == 0)  # the two new rows score 0: pruned first


def test_info_for_applies_the_grown_rows_rule(cli, family):
    """`info --for` says yes to an ancestor's sidecar whose head rows are fewer than the grown head's, as prune does."""
    d, f = family
    r = cli("info", f["a_imp"], "--for", f["g"], "--json")
    assert r.code == 0, r.err
    rel = json.loads(r.out)[0]["for"]
    assert rel["usable"] is True and rel["generations"] == 1
    assert "net.3.bias, net.3.weight" in rel["reason"] and "score 0" in rel["reason"]


# ----------------------------------------------------------------------------- train-next with an ancestor's Ω


def test_train_next_records_an_ancestors_sidecar(family):
    d, f = family
    from cl_tool.checkpoint import load_checkpoint

    last = load_checkpoint(f["c"]).history[-1]
    assert last["penalty"] == "stabilized" and last["importance"] == str(f["a_imp"])
    assert last["importance_fingerprint"] == _fp(f["a"]) and last["importance_generations"] == 1
    assert last["anchor_fingerprint"] == _fp(f["b"])  # θ* is the current checkpoint, not the ancestor


def test_train_next_ancestor_note_and_json(cli, family, demo_dir, tmp_path):
    d, f = family
    out = tmp_path / "e.safetensors"
    r = cli(
        "train-next",
        f["bp"],
        "--data",
        f"{demo_dir}::limit=32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--importance",
        f["a_imp"],
        "-o",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    assert "2 generations back" in r.err and str(f["a_imp"]) in r.err
    res = json.loads(r.out)
    assert (
        res["importance"] == str(f["a_imp"])
        and res["importance_generations"] == 2
        and res["importance_fingerprint"] == _fp(f["a"])
    )


def test_train_next_pads_grown_rows_of_an_ancestor(cli, family, tmp_path):
    d, f = family
    out = tmp_path / "g2.safetensors"
    r = cli(
        "train-next",
        f["g"],
        "--data",
        f"{d / 'twelve'}::limit=32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--importance",
        f["a_imp"],
        "-o",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["importance_generations"] == 1


def test_train_next_refuses_a_sibling(cli, family, demo_dir, tmp_path):
    d, f = family
    before = snapshot_dir(d)
    r = cli(
        "train-next",
        f["b"],
        "--data",
        f"{demo_dir}::limit=32",
        "--device",
        "cpu",
        "--importance",
        f["s_imp"],
        "-o",
        tmp_path / "x.safetensors",
    )
    assert r.code == 4 and "belongs to another checkpoint" in r.error_line, r.err
    assert snapshot_dir(d) == before and not (tmp_path / "x.safetensors").exists()


def test_edited_history_is_metadata_not_a_signature(cli, family, tmp_path):
    """Lineage prevents mistakes; whoever edits the history can make any sidecar 'an ancestor's' (documented)."""
    from safetensors.torch import load_file, save_file

    from cl_tool.safetensors_io import read_header

    d, f = family
    _, meta = read_header(f["other"])
    hist = json.loads(meta["cl_tool.history"]) + [{"command": "train-next", "anchor_fingerprint": _fp(f["a"])}]
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(str(f["other"])), str(forged), {**meta, "cl_tool.history": json.dumps(hist)})
    r = cli(
        "prune",
        forged,
        "--by",
        "importance",
        "--importance",
        f["a_imp"],
        "--sparsity",
        "0.5",
        "-o",
        tmp_path / "p.safetensors",
    )
    assert r.code == 0, r.err
