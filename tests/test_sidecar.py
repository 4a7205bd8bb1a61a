"""The sidecar format: Ω per trainable parameter plus the metadata that ties it to a checkpoint and its tasks."""

from __future__ import annotations

import json

import pytest
import torch

from cl_tool.errors import BadInputError, IncompatibleError
from cl_tool.safetensors_io import read_header
from cl_tool.sidecar import (
    Sidecar,
    check_covers,
    combine,
    default_sidecar_path,
    load_sidecar,
    save_sidecar,
)


def _sidecar(**kw) -> Sidecar:
    tensors = {"w": torch.tensor([[0.5, 2.0], [0.0, 1.0]]), "b": torch.tensor([3.0, 0.25], dtype=torch.float64)}
    return Sidecar(
        tensors=tensors,
        method="fisher",
        options={"fisher_labels": "empirical"},
        data={"name": "A", "samples": 8},
        fingerprint="f" * 32,
        tasks=[{"method": "fisher", "fingerprint": "f" * 32}],
        **kw,
    )


def test_default_path_sits_beside_the_checkpoint(tmp_path):
    assert default_sidecar_path(tmp_path / "a.safetensors") == tmp_path / "a.importance.safetensors"
    assert default_sidecar_path(tmp_path / "vit_folder") == tmp_path / "vit_folder.importance.safetensors"


def test_round_trip_keeps_values_as_float32_and_the_metadata(tmp_path):
    path = tmp_path / "a.importance.safetensors"
    save_sidecar(path, _sidecar(decay=0.9))
    header, meta = read_header(path)
    assert meta["cl_tool.sidecar"] == "1" and meta["method"] == "fisher" and meta["fingerprint"] == "f" * 32
    assert {e["dtype"] for e in header.values()} == {"F32"}
    assert json.loads(meta["tasks"]) == [{"method": "fisher", "fingerprint": "f" * 32}] and float(meta["decay"]) == 0.9
    back = load_sidecar(path)
    assert (
        back.options == {"fisher_labels": "empirical"}
        and back.data == {"name": "A", "samples": 8}
        and back.path == str(path)
    )
    for name, t in _sidecar().tensors.items():
        assert torch.equal(back.tensors[name], t.float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "negative"])
def test_invalid_values_are_never_written(tmp_path, bad):
    sc = _sidecar()
    sc.tensors["w"][0, 0] = bad
    with pytest.raises(BadInputError, match="'w'"):
        save_sidecar(tmp_path / "x.importance.safetensors", sc)
    assert list(tmp_path.iterdir()) == []


def test_belongs_to_and_covers():
    from types import SimpleNamespace

    from cl_tool.lineage import check_sidecar

    sc = _sidecar()
    assert check_sidecar(sc, SimpleNamespace(fingerprint="f" * 32, history=[]), "a.safetensors").generations == 0
    with pytest.raises(IncompatibleError, match="belongs to another checkpoint"):
        check_sidecar(sc, SimpleNamespace(fingerprint="0" * 32, history=[]), "b.safetensors")
    check_covers(sc, {"w": torch.zeros(2, 2), "b": torch.zeros(2)}, "a.safetensors")
    with pytest.raises(IncompatibleError, match="has shape"):
        check_covers(sc, {"w": torch.zeros(3, 2), "b": torch.zeros(2)}, "a.safetensors")
    with pytest.raises(IncompatibleError, match="no entry for parameter 'c'"):
        check_covers(sc, {"w": torch.zeros(2, 2), "b": torch.zeros(2), "c": torch.zeros(1)}, "a.safetensors")
    with pytest.raises(IncompatibleError, match="has an entry for 'b', which a.safetensors does not have"):
        check_covers(sc, {"w": torch.zeros(2, 2)}, "a.safetensors")  # an extra entry: refused, as in a mask


def test_combine_is_decayed_sum():
    prev = _sidecar()
    new = {"w": torch.ones(2, 2), "b": torch.ones(2, dtype=torch.float64)}
    out = combine(prev, new, 0.5)
    assert torch.equal(out["w"], 0.5 * prev.tensors["w"] + 1)
    with pytest.raises(IncompatibleError, match="shape"):
        combine(prev, {"w": torch.ones(3), "b": torch.ones(2)}, 1.0)
    with pytest.raises(IncompatibleError, match="has an entry for 'b'"):
        combine(prev, {"w": torch.ones(2, 2)}, 1.0)  # an entry of the old sidecar this model lacks
