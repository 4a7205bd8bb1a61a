"""The mask format written by ``prune --mask-out`` and read by ``train-next --mask``."""

from __future__ import annotations

import pytest
import torch

from cl_tool.errors import BadInputError, IncompatibleError
from cl_tool.masks import load_mask, save_mask
from cl_tool.safetensors_io import read_header, save_tensors


def test_round_trip_as_uint8_with_the_record(tmp_path):
    path = tmp_path / "m.mask.safetensors"
    keep = {"w": torch.tensor([[True, False], [False, True]])}
    save_mask(path, keep, by="magnitude", scope="global", sparsity=0.5, fingerprint="a" * 32, force=False)
    header, meta = read_header(path)
    assert header["w"]["dtype"] == "U8" and meta == {
        "cl_tool.mask": "1",
        "by": "magnitude",
        "scope": "global",
        "sparsity": "0.5",
        "fingerprint": "a" * 32,
    }
    params = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    back = load_mask(path, params)
    assert back["w"].dtype == torch.float64 and torch.equal(back["w"], keep["w"].double())


def test_a_mask_must_fit_the_model(tmp_path):
    path = tmp_path / "m.mask.safetensors"
    save_mask(
        path,
        {"w": torch.ones(2, 2, dtype=torch.bool)},
        by="magnitude",
        scope="layer",
        sparsity=0.0,
        fingerprint="",
        force=False,
    )
    with pytest.raises(IncompatibleError, match="has shape"):
        load_mask(path, {"w": torch.zeros(3, 2)})
    with pytest.raises(IncompatibleError, match="does not have"):
        load_mask(path, {"v": torch.zeros(2, 2)})
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"w": torch.ones(2, 2)}, {"format": "x"}, force=False)
    with pytest.raises(BadInputError, match="not a cl-tool mask file"):
        load_mask(other, {"w": torch.zeros(2, 2)})
