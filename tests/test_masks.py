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


def _mask_file(path, tensors):
    save_tensors(
        path, tensors, {"cl_tool.mask": "1", "by": "magnitude", "scope": "global", "sparsity": "0.5"}, force=True
    )
    return path


@pytest.mark.parametrize(
    ("dtype", "value", "shown"),
    [
        (torch.uint8, 2, "2"),
        (torch.float32, 2.0, "2"),
        (torch.float32, 0.5, "0.5"),
        (torch.float32, -1.0, "-1"),
        (torch.float32, float("nan"), "nan"),
        (torch.float32, float("inf"), "inf"),
        (torch.float16, 1.0 + 2**-10, "1.00098"),  # next float16 after 1
    ],
)
def test_mask_values_other_than_0_and_1_are_refused_naming_file_tensor_and_value(tmp_path, dtype, value, shown):
    """load_mask and info --verify share one rule: every value is exactly 0 or 1."""
    from cl_tool.masks import mask_value_problem

    m = torch.tensor([[1, 0], [1, 1]], dtype=dtype)
    m[1, 0] = value
    path = _mask_file(tmp_path / "m.mask.safetensors", {"ok": torch.ones(3, dtype=torch.uint8), "w": m})
    with pytest.raises(BadInputError) as exc:
        load_mask(path, {"ok": torch.zeros(3), "w": torch.zeros(2, 2)})
    msg = exc.value.message
    assert str(path) in msg and "'w'" in msg and f"(e.g. {shown})" in msg and "'ok'" not in msg
    assert mask_value_problem("M", "w", m) is not None
    assert mask_value_problem("M", "w", torch.tensor([0.0, 1.0, -0.0])) is None  # -0.0 == 0


def test_a_mask_without_an_entry_leaves_that_parameter_unmasked(tmp_path):
    path = _mask_file(tmp_path / "m.mask.safetensors", {"w": torch.tensor([1, 0], dtype=torch.uint8)})
    back = load_mask(path, {"w": torch.zeros(2), "b": torch.zeros(3)})
    assert set(back) == {"w"} and torch.equal(back["w"], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    ("case", "code", "phrase"),
    [
        ("two", 3, "values other than 0 and 1 in 'net.3.weight' (e.g. 2)"),
        ("half", 3, "values other than 0 and 1 in 'net.3.weight' (e.g. 0.5)"),
        ("nan", 3, "values other than 0 and 1 in 'net.3.weight' (e.g. nan)"),
        ("shape", 4, "'net.3.weight' has shape [10, 63]"),
        ("extra", 4, "'net.9.weight', which the model does not have"),
    ],
)
def test_train_next_refuses_a_bad_mask_before_training(cli, small_mlp, demo_dir, tmp_path, case, code, phrase):
    """Values: exit 3 (bad file, as info --verify says); names/shapes: exit 4 (mask and model don't belong together,
    as info --for says). Nothing is written."""
    m = torch.ones(10, 64)
    if case == "two":
        m[0, 0] = 2
    elif case == "half":
        m[3, 5] = 0.5
    elif case == "nan":
        m[9, 63] = float("nan")
    elif case == "shape":
        m = torch.ones(10, 63)
    tensors = {"net.3.weight": m, **({"net.9.weight": torch.ones(2)} if case == "extra" else {})}
    mask = _mask_file(tmp_path / "bad.mask.safetensors", tensors)
    out = tmp_path / "o.safetensors"
    argv = ["train-next", small_mlp, "--data", f"{demo_dir}::limit=16", "--device", "cpu", "--penalty", "none"]
    r = cli(*argv, "--mask", mask, "-o", out)
    assert r.code == code, r.err
    assert phrase in r.error_line and str(mask) in r.error_line and "Traceback" not in r.err
    assert not out.exists()
    if code == 3:  # info --verify gives the same sentence for the same file
        r = cli("info", mask, "--verify")
        assert r.code == 3 and phrase in r.err


def test_train_next_trains_a_parameter_the_mask_has_no_entry_for(cli, small_mlp, demo_dir, tmp_path):
    from safetensors.torch import load_file

    keep = (torch.arange(640).reshape(10, 64) % 2).float()
    mask = _mask_file(tmp_path / "m.mask.safetensors", {"net.3.weight": keep})
    out = tmp_path / "o.safetensors"
    argv = ["train-next", small_mlp, "--data", f"{demo_dir}::limit=64", "--device", "cpu", "--penalty", "none"]
    assert cli(*argv, "--mask", mask, "-o", out).code == 0
    before, after = load_file(str(small_mlp)), load_file(str(out))
    assert torch.all(after["net.3.weight"][keep == 0] == 0) and torch.all(after["net.3.weight"][keep == 1] != 0)
    # not in the mask: trained (Adam moves every weight) and nothing zeroed
    assert not torch.equal(after["net.1.weight"], before["net.1.weight"])
    assert int((after["net.1.weight"] == 0).sum()) == 0
