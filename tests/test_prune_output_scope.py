"""prune --scope output: the same sparsity within each output row (Linear row, conv output channel)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl_tool.errors import BadInputError
from cl_tool.pruning import output_masks


def test_per_row_cut_by_hand():
    """Rows of 4 at 50 %: k = 2 per row; row 1's tie at 1.0 goes to the earlier index; the 1-D tensor is one group."""
    scores = {
        "w": torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 5.0, 1.0, 1.0], [-0.0, 0.0, 7.0, -1.0]]),
        "b": torch.tensor([3.0, 1.0, 2.0]),
    }
    m = output_masks(scores, 0.5)
    assert m["w"].tolist() == [[True, False, True, False], [False, True, False, True], [False, True, True, False]]
    assert m["b"].tolist() == [True, False, False]  # k = ⌊0.5·3 + ½⌋ = 2: 1.0 and 2.0
    assert m["w"].dtype == torch.bool


def test_conv_output_channel_is_one_group_and_k_rounds_half_up():
    """A (2, 3, 1, 1) kernel: each output channel holds 3 weights; 50 % → k = ⌊1.5 + ½⌋ = 2 per channel."""
    s = np.array([[3.0, 1.0, 2.0], [0.5, 0.25, 9.0]], dtype=np.float32).reshape(2, 3, 1, 1)
    m = output_masks({"conv": s}, 0.5)
    assert m["conv"].reshape(2, 3).tolist() == [[True, False, False], [False, False, True]]
    assert output_masks({"conv": s}, 0.1)["conv"].all()  # ⌊0.3 + ½⌋ = 0
    assert output_masks({"conv": s}, 0.2)["conv"].reshape(2, 3).tolist() == [[True, False, True], [True, False, True]]


def test_matches_a_stable_sort_of_each_row_and_refuses_nan():
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 4, (7, 3, 2, 2), generator=gen).float()  # many ties
    m = output_masks({"t": t}, 0.7)["t"].reshape(7, -1)
    k = 8  # ⌊0.7·12 + ½⌋
    for j, row in enumerate(t.reshape(7, -1)):
        order = np.argsort(row.numpy(), kind="stable")
        want = np.ones(12, dtype=bool)
        want[order[:k]] = False
        assert m[j].tolist() == want.tolist()
    with pytest.raises(BadInputError, match="'t'"):
        output_masks({"t": torch.tensor([[1.0, float("nan")]])}, 0.5)
    assert output_masks({"e": torch.zeros(0, 3)}, 0.5)["e"].shape == (0, 3)


def test_cli_output_scope_prunes_each_row_of_the_mlp(cli, small_mlp, tmp_path):
    """--by magnitude --scope output: every row of every selected weight loses exactly ⌊0.8·n_in + ½⌋ weights, the
    smallest |w| of that row."""
    from safetensors.torch import load_file

    out = tmp_path / "p.safetensors"
    r = cli("prune", small_mlp, "--by", "magnitude", "--scope", "output", "--sparsity", "0.8", "-o", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["scope"] == "output"
    before, after = load_file(small_mlp), load_file(out)
    w0, w1 = before["net.1.weight"], after["net.1.weight"]  # 64 × 784; the classifier is not selected
    k = int(0.8 * 784 + 0.5)
    assert ((w1 == 0).sum(1) >= k).all()
    for j in (0, 31, 63):
        dropped = torch.argsort(w0[j].abs(), stable=True)[:k]
        assert (w1[j, dropped] == 0).all()
        kept = torch.ones(784, dtype=torch.bool)
        kept[dropped] = False
        assert torch.equal(w1[j, kept], w0[j, kept])
    assert torch.equal(after["net.3.weight"], before["net.3.weight"])
