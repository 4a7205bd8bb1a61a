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
    r = cli(
        "init",
        "--arch",
        "vit_tiny_patch16_224",
        "--arch-arg",
        "img_size=28",
        "--arch-arg",
        "patch_size=4",
        "--input-shape",
        "1x28x28",
        "--num-classes",
        "10",
        "-o",
        out,
    )
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
    cfg = {
        "architecture": "resnet10t",
        "num_classes": 10,
        "model_args": {"in_chans": 1},
        "pretrained_cfg": {"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5]},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    r = cli("evaluate", folder, "--data", f"{demo_dir}::split=test,limit=64", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert 0.0 <= res["accuracy"][0][0] <= 1.0


def test_mlp_sizes_must_match_input(cli, tmp_path):
    r = cli(
        "init",
        "--arch",
        "mlp",
        "--arch-arg",
        "sizes=100,10",
        "--input-shape",
        "1x28x28",
        "-o",
        tmp_path / "x.safetensors",
    )
    assert r.code == 2 and "784" in r.error_line
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("with_metadata", [True, False])
def test_writer_output_reads_back_through_the_safetensors_library(tmp_path, with_metadata):
    """cl-tool writes safetensors itself (no copy of the tensors); the library must read every dtype back bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cl_tool.safetensors_io import read_header, write_safetensors_file

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=gen),
        "d": torch.randn(7, dtype=torch.float64, generator=gen),
        "h": torch.randn(4, generator=gen).half(),
        "b": torch.randn(2, 2, generator=gen).bfloat16(),
        "i": torch.arange(-3, 3, dtype=torch.int64),
        "q": torch.arange(9, dtype=torch.int8).reshape(3, 3),
        "u": torch.arange(5, dtype=torch.uint8),
        "m": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "a_bool_then_float": torch.ones(1, dtype=torch.bool),
    }
    meta = {"cl_tool.x": "1", "note": "ünïcode"} if with_metadata else {}
    path = tmp_path / "t.safetensors"
    write_safetensors_file(tensors, path, meta)
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    with safe_open(str(path), "pt") as fh:
        assert (fh.metadata() or {}) == meta
    header, _ = read_header(path)
    raw_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + raw_len) % 8 == 0
    for entry in header.values():  # every tensor starts aligned to its item size
        size = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(entry["dtype"], 1)
        assert entry["data_offsets"][0] % size == 0


def test_init_leaves_batchnorm_statistics_untouched(cli, tmp_path):
    """init's shape probe runs in eval mode: a fresh model's running mean is 0, its variance 1, no batch tracked."""
    from safetensors.torch import load_file

    out = tmp_path / "c.safetensors"
    assert cli("init", "--arch", "cnn", "--arch-arg", "widths=4,8,8", "-o", out).code == 0
    state = load_file(str(out))
    means = [k for k in state if k.endswith("running_mean")]
    assert means
    for k in means:
        stem = k[: -len("running_mean")]
        assert float(state[k].abs().max()) == 0.0
        assert float((state[stem + "running_var"] - 1).abs().max()) == 0.0
        assert int(state[stem + "num_batches_tracked"]) == 0
