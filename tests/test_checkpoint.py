"""Checkpoint format: self-describing safetensors, rebuilt without any other file; timm folders as input."""

import json

import pytest
import torch


def test_init_writes_self_describing_checkpoint(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli("init", "--arch", "cnn", "--input-shape", "1x28x28", "--num-classes", "7", "-o", out, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["num_classes"] == 7
    from cl_tool.checkpoint import instantiate, load_checkpoint

    ckpt = load_checkpoint(out)
    assert ckpt.spec.arch == "cnn" and ckpt.spec.input_shape == (1, 28, 28) and ckpt.spec.num_classes == 7
    assert ckpt.history[0]["command"] == "init"
    model = instantiate(ckpt)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert ckpt.fingerprint == info["fingerprint"]


def test_timm_vit_checkpoint_roundtrip(cli, tmp_path):
    out = tmp_path / "vit.safetensors"
    r = cli("init", "--arch", "vit_tiny_patch16_224", "--arch-arg", "img_size=28", "--arch-arg", "patch_size=4",
            "--input-shape", "1x28x28", "--num-classes", "10", "-o", out)
    assert r.code == 0, r.err
    from cl_tool.checkpoint import instantiate, load_checkpoint

    model = instantiate(load_checkpoint(out))
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_timm_folder_is_accepted(cli, tmp_path, demo_dir):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {"architecture": "resnet10t", "num_classes": 10, "model_args": {"in_chans": 1},
           "pretrained_cfg": {"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5]}}
    (folder / "config.json").write_text(json.dumps(cfg))
    r = cli("evaluate", folder, "--data", f"{demo_dir}::split=test,limit=64", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert 0.0 <= res["accuracy"][0][0] <= 1.0


def test_mlp_sizes_must_match_input(cli, tmp_path):
    r = cli("init", "--arch", "mlp", "--arch-arg", "sizes=100,10", "--input-shape", "1x28x28", "-o", tmp_path / "x.safetensors")
    assert r.code == 2 and "784" in r.error_line
    assert not (tmp_path / "x.safetensors").exists()
