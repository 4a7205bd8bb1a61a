"""timm models: timm's eval transform (then normalised) exactly; timm's training augmentation seeded and worker-independent."""

from __future__ import annotations

import pytest
import torch

from cl_tool.data import Preprocess, TaskSpec, open_task, parse_augment
from cl_tool.data.preprocess import resolve_timm_data_config
from cl_tool.errors import UsageError
from cl_tool.models import ModelSpec, default_spec
from tests._data_util import collect, imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return imagefolder(tmp_path_factory.mktemp("timm") / "data", per_class=3, ext="jpg")


def _images(folder):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    return [ds[i]["image"].convert("RGB") for i in range(len(ds))]


def test_for_model_resolves_timm_data_config():
    spec = default_spec("resnet18", {}, (3, 48, 40), 3)
    assert (
        Preprocess.for_model(spec).kind == "builtin"
    )  # no recorded data config: a checkpoint from before they were recorded
    spec.data_config = resolve_timm_data_config(spec.arch, spec.input_shape, spec.mean, spec.std)  # what `init` records
    pre = Preprocess.for_model(spec)
    assert pre.kind == "timm" and pre.data_config["input_size"] == (3, 48, 40)
    assert (
        pre.data_config["interpolation"] == "bicubic" and pre.data_config["crop_pct"] == 0.95
    )  # resnet18's pretrained cfg
    assert tuple(pre.mean) == tuple(spec.mean)
    builtin = Preprocess.for_model(ModelSpec(arch="mlp", input_shape=(1, 28, 28), mean=(0.1,), std=(0.3,)))
    assert builtin.kind == "builtin" and builtin.data_config is None


@pytest.mark.parametrize("recorded", [None, {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}])
def test_timm_preprocess_matches_create_transform(folder, recorded):
    from timm.data import create_transform

    spec = default_spec("resnet18", {}, (3, 32, 32), 3)
    # what `init` records for this architecture, or a checkpoint's own recorded geometry
    spec.data_config = resolve_timm_data_config(spec.arch, spec.input_shape, spec.mean, spec.std)
    if recorded is not None:
        spec.data_config = {"input_size": (3, 32, 32), **recorded}
    pre = Preprocess.for_model(spec)
    if recorded is not None:
        assert pre.data_config["crop_mode"] == "squash"
    expected = torch.stack([create_transform(**pre.data_config, is_training=False)(img) for img in _images(folder)])
    for workers in (0, 2):
        task = open_task(TaskSpec(str(folder)), pre, cache="none", workers=workers)
        _, x, _ = collect(task, batch_size=4)
        assert torch.equal(x, expected)  # resize, crop, interpolation, mean/std: bit for bit
        task.close()


def test_timm_augmentation_is_seeded_worker_independent_and_bypasses_the_cache(folder, tmp_path):
    pre = Preprocess.for_model(default_spec("resnet18", {}, (3, 24, 24), 3))
    aug = parse_augment("timm", ["auto_augment=rand-m9-mstd0.5", "hflip=0.5"])
    runs = {}
    for workers in (0, 2):
        task = open_task(TaskSpec(str(folder)), pre, cache="auto", workers=workers, cache_dir=tmp_path / f"c{workers}")
        runs[workers] = [
            collect(task, batch_size=4, augment=aug, seed=s, epoch=e)[1] for s, e in ((1, 0), (1, 0), (1, 1), (2, 0))
        ]
        assert task.stats["decoded"] == 4 * len(task)  # every augmented pass decodes the original image
        assert not [p for p in (tmp_path / f"c{workers}").iterdir() if p.suffix == ".cltd"]
        _, plain, _ = collect(task, batch_size=4)
        assert not torch.equal(plain, runs[workers][0])
        task.close()
    a = runs[0]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2]) and not torch.equal(a[0], a[3])
    assert all(torch.equal(p, q) for p, q in zip(runs[0], runs[2]))
    assert a[0].shape == (9, 3, 24, 24)


def test_timm_augmentation_with_a_builtin_model(folder):
    task = open_task(TaskSpec(str(folder)), Preprocess.builtin((1, 20, 20), (0.5,), (0.25,)), cache="none", workers=0)
    _, x, _ = collect(task, batch_size=5, augment="timm", seed=0)
    assert x.shape == (9, 1, 20, 20)
    task.close()


@pytest.mark.parametrize(
    "value,args,match",
    [
        ("shift", None, "shift=K"),
        ("shift=-1", None, "shift=K"),
        ("crop", None, "is unknown"),
        ("timm", ["re_prob=0.5"], "not a timm augmentation option"),
        ("none", ["hflip=0.5"], "only applies with augment timm"),
    ],
)
def test_parse_augment_errors(value, args, match):
    with pytest.raises(UsageError, match=match):
        parse_augment(value, args)


def test_parse_augment_values():
    a = parse_augment("timm", ["scale=0.5,1.0", "hflip=0", "color_jitter=0.2", "auto_augment=rand-m9"])
    assert a.args == {"scale": (0.5, 1.0), "hflip": 0, "color_jitter": 0.2, "auto_augment": "rand-m9"}
    assert (
        parse_augment("shift=2").shift == 2
        and parse_augment(None).kind is None
        and parse_augment("none").describe() == "none"
    )


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_folder_geometry_equals_resolve_data_config(tmp_path, arch):
    """A timm config.json's data config is read without timm, and is what timm.data.resolve_data_config gives for it."""
    import json

    import timm
    from timm.data import resolve_data_config

    from cl_tool.checkpoint import spec_from_timm_config

    pcfg = timm.models.get_pretrained_cfg(arch).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 5, "pretrained_cfg": pcfg}))
    spec = spec_from_timm_config(tmp_path / "config.json")
    expected = resolve_data_config(args={}, pretrained_cfg=pcfg)
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
        assert (
            tuple(spec.data_config[key]) == tuple(expected[key])
            if isinstance(expected[key], tuple)
            else spec.data_config[key] == expected[key]
        ), key
