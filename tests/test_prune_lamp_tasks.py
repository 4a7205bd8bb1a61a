"""prune --scope lamp (layer-adaptive normalisation of any score) and --sweep over several --data tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl_tool.errors import BadInputError
from cl_tool.pruning import global_masks, lamp_masks, lamp_scores


def test_lamp_scores_by_hand():
    """Sorted |w| = 0, 1, 2, 3: squares 0, 1, 4, 9; tails 14, 14, 13, 9 → 0, 1/14, 4/13, 1; an all-zero tensor scores 0."""
    s = lamp_scores({"w": torch.tensor([[3.0, -1.0], [2.0, 0.0]]).abs(), "z": torch.zeros(3)})
    assert s["w"].reshape(-1).tolist() == pytest.approx([1.0, 1 / 14, 4 / 13, 0.0])
    assert s["w"].shape == (2, 2) and s["z"].tolist() == [0.0, 0.0, 0.0]


def test_lamp_compares_tensors_of_different_scales_where_global_does_not():
    """A tensor scaled by 1000 has the same LAMP scores; a global cut on raw scores prunes the small tensor first,
    LAMP keeps each tensor's top score until 100 %."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=gen) + 0.1
    b = 1000 * a.clone()
    s = lamp_scores({"a": a, "b": b})
    assert np.allclose(s["a"], s["b"])
    raw = global_masks({"a": a, "b": b}, 0.5)
    assert int(raw["a"].sum()) == 0 and int(raw["b"].sum()) == 50  # by scale alone
    m = lamp_masks({"a": a, "b": b}, 0.98)  # 98 of 100 pruned: each tensor keeps its largest
    assert m["a"].dtype == torch.bool and int(m["a"].sum()) == 1 and int(m["b"].sum()) == 1
    assert bool(m["a"][a.argmax()]) and bool(m["b"][b.argmax()])
    with pytest.raises(BadInputError, match="'n'"):
        lamp_scores({"n": torch.tensor([1.0, float("nan")])})


def test_lamp_equals_a_global_cut_on_the_normalised_scores():
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(6, 5, generator=gen), "b": torch.rand(40, generator=gen) * 7}
    want = global_masks({n: torch.from_numpy(v) for n, v in lamp_scores(scores).items()}, 0.6)
    got = lamp_masks(scores, 0.6)
    assert all(torch.equal(got[n], want[n]) for n in scores)
    assert sum(int((~m).sum()) for m in got.values()) == 42  # ⌊0.6·70 + ½⌋


def test_cli_lamp_scope_writes_the_lamp_masks(cli, small_mlp, tmp_path):
    from safetensors.torch import load_file

    out, mask = tmp_path / "p.safetensors", tmp_path / "m.safetensors"
    r = cli("prune", small_mlp, "--by", "magnitude", "--scope", "lamp", "-s", "0.9", "-o", out, "--mask-out", mask)
    assert r.code == 0, r.err
    before, masks = load_file(small_mlp), load_file(mask)
    weights = {n: before[n].abs() for n in masks}
    want = lamp_masks(weights, 0.9)
    for n in masks:
        assert torch.equal(masks[n].bool(), want[n]), n
        assert int(masks[n].sum()) >= 1  # LAMP never empties a layer


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory, demo_dir):
    """An MLP trained on the demo task A, then on B = A rotated by 90°."""
    from cl_tool.cli import main

    d = tmp_path_factory.mktemp("tasks")
    a0, a, b = d / "a0.safetensors", d / "a.safetensors", d / "b.safetensors"
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,32,10", "-o", a0],
        ["train-next", a0, "--data", f"{demo_dir}::limit=600", "--epochs", "2", "--device", "cpu", "-o", a],
        ["train-next", a, "--data", f"{demo_dir}::limit=600,rotate=90", "--epochs", "2", "--device", "cpu", "-o", b],
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(x) for x in argv])
        assert exc.value.code == 0
    return b


def test_sweep_over_several_tasks_gives_each_task_and_their_mean(cli, two_tasks, demo_dir, tmp_path):
    """Each task's figure at a sparsity is what evaluate gives on the checkpoint pruned to that sparsity; the point's
    accuracy is their mean."""
    b = two_tasks
    tasks = ["--data", f"A={demo_dir}::split=test", "--data", f"B={demo_dir}::split=test,rotate=90"]
    r = cli("prune", b, "--by", "magnitude", "--sweep", "0,0.8", *tasks, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert [d["name"] for d in res["data"]] == ["A", "B"]
    pruned = tmp_path / "b80.safetensors"
    assert cli("prune", b, "--by", "magnitude", "-s", "0.8", "-o", pruned).code == 0
    ev = json.loads(cli("evaluate", b, pruned, *tasks, "--device", "cpu", "--json").out)
    p0, p80 = res["curves"]["magnitude"]
    assert p0["tasks"] == pytest.approx(dict(zip(["A", "B"], ev["accuracy"][0], strict=True)), abs=1e-12)
    assert p80["tasks"] == pytest.approx(dict(zip(["A", "B"], ev["accuracy"][1], strict=True)), abs=1e-12)
    assert p80["accuracy"] == pytest.approx(sum(ev["accuracy"][1]) / 2, abs=1e-12)
    assert res["unpruned"] == p0["tasks"] and res["unpruned_accuracy"] == pytest.approx(p0["accuracy"])
    human = cli("prune", b, "--by", "magnitude", "--sweep", "0.8", *tasks, "--device", "cpu")
    assert human.code == 0 and "magnitude mean" in human.out and "(mean over the tasks)" in human.out


def test_sweep_tasks_need_their_own_names(cli, two_tasks, demo_dir):
    r = cli("prune", two_tasks, "--by", "magnitude", "--sweep", "0.5", "--data", str(demo_dir), "--data", str(demo_dir))
    assert r.code == 2 and "Two --data tasks are named demo" in r.error_line
