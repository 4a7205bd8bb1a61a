"""cl-tool convert: a timm folder with only pytorch_model.bin becomes a checkpoint, read with torch.load(weights_only=True)."""

from __future__ import annotations

import json
import os
import pickle
import shlex

import pytest
import torch

from tests.conftest import snapshot_dir


def _timm_folder(path, weights: str):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "resnet10t",
                "num_classes": 10,
                "pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.5]},
            }
        )
    )
    state = model.state_dict()
    if weights == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return state


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_round_trip(cli, tmp_path, demo_dir, weights):
    state = _timm_folder(tmp_path / "tf", weights)
    if weights == "bin":  # the other commands refuse it and point to convert
        r = cli("evaluate", tmp_path / "tf", "--data", f"{demo_dir}::limit=8", "--device", "cpu")
        assert r.code == 3 and "cl-tool convert" in r.error_line
    out = tmp_path / "r10.safetensors"
    r = cli("convert", tmp_path / "tf", "-o", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["weights"] == ("pytorch_model.bin" if weights == "bin" else "model.safetensors")
    if weights == "bin":
        assert "weights_only=True" in r.err
    from cl_tool.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out)
    assert ckpt.spec.arch == "resnet10t" and ckpt.history[-1]["command"] == "convert"
    for name, tensor in state.items():
        assert torch.equal(ckpt.state[name], tensor), name
    r = cli("evaluate", out, "--data", f"{demo_dir}::limit=8", "--device", "cpu")
    assert r.code == 0, r.err


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("payload", ["plain-pickle", "torch-zip"])
def test_a_pickle_with_code_is_refused_and_never_run(cli, tmp_path, payload):
    folder = tmp_path / "tf"
    _timm_folder(folder, "bin")
    marker = tmp_path / "PWNED"
    evil = {"conv1.weight": _Evil(marker)}
    if payload == "plain-pickle":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save(evil, folder / "pytorch_model.bin")
    before = snapshot_dir(tmp_path)
    r = cli("convert", folder, "-o", tmp_path / "out.safetensors")
    assert r.code == 3 and "weights_only=True" in r.error_line, r.err
    assert "Traceback" not in r.err
    assert not marker.exists()
    assert snapshot_dir(tmp_path) == before


def test_weights_that_do_not_fit_the_config_are_refused(cli, tmp_path):
    folder = tmp_path / "tf"
    _timm_folder(folder, "bin")
    torch.save({"fc.weight": torch.zeros(3, 3)}, folder / "pytorch_model.bin")
    r = cli("convert", folder, "-o", tmp_path / "out.safetensors")
    assert r.code == 4 and not (tmp_path / "out.safetensors").exists(), r.err


def test_output_inside_the_folder_is_refused(cli, tmp_path):
    folder = tmp_path / "tf"
    _timm_folder(folder, "bin")
    r = cli("convert", folder, "-o", folder / "model.safetensors")
    assert r.code == 6 and "lies inside" in r.error_line
