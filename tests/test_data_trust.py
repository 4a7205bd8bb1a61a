"""Numbers a user can trust on their own data layouts: labels by class name, the split and subset they meant,
local files read as they are now. Each test asserts the number a correct tool gives, not only the exit code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest


def _demo_split(demo_dir: Path, split: str):
    import datasets

    return datasets.load_from_disk(str(demo_dir))[split]


def _imagefolder(root: Path, demo_dir: Path, split: str = "test", classes=None, *, names=None, folder="test"):
    """The demo split as PNG class folders under ``root/folder`` (class c named ``names[c]``, default str(c))."""
    ds = _demo_split(demo_dir, split)
    for i, row in enumerate(ds):
        c = row["label"]
        if classes is not None and c not in classes:
            continue
        name = names[c] if names else str(c)
        d = root / folder / name if folder else root / name
        d.mkdir(parents=True, exist_ok=True)
        row["image"].save(d / f"{i:05d}.png")
    return root


def _predictions(ckpt: Path, source: Path, split: str | None = None):
    """(predicted row, label row) for every sample of ``source``, computed directly from the model."""
    import torch

    from cl_tool.checkpoint import load_model
    from cl_tool.data import DataOptions, open_tasks, task_specs

    c, model = load_model(ckpt)
    model.eval()
    value = f"{source}::split={split}" if split else str(source)
    (task,) = open_tasks(
        task_specs([value], DataOptions(workers=0, cache="none"), role="eval"),
        c.spec,
        DataOptions(workers=0),
        match=True,
    )
    with task, torch.no_grad():
        pred, lab = [], []
        for b in task.batches(batch_size=256):
            pred.append(model(b.x).argmax(1))
            lab.append(b.y)
    return torch.cat(pred).numpy(), torch.cat(lab).numpy()


def _acc(cli, ckpt, *data, extra=()):
    args = ["evaluate", ckpt, *sum((["--data", d] for d in data), []), "--workers", "0", "--json", *extra]
    r = cli(*args)
    assert r.code == 0, r.err
    return json.loads(r.out), r.err


# ----------------------------------------------------------------------------------------------- labels by name


@pytest.mark.parametrize("subset", [(5, 6, 7, 8, 9), (2, 7, 9), (0,)])
def test_subset_folder_scored_by_class_name(cli, tmp_path, demo_dir, small_mlp, subset):
    """A test folder holding some of the classes: its accuracy equals the accuracy on those classes in the full folder."""
    full = _imagefolder(tmp_path / "full", demo_dir)
    part = _imagefolder(tmp_path / "part", demo_dir, classes=set(subset))
    pred, lab = _predictions(small_mlp, full)
    keep = np.isin(lab, subset)
    expected = float((pred[keep] == lab[keep]).mean())
    doc, err = _acc(cli, small_mlp, full, part)
    assert doc["accuracy"][0][1] == pytest.approx(expected, abs=1e-9)
    assert doc["accuracy"][0][0] == pytest.approx(float((pred == lab).mean()), abs=1e-9)
    assert doc["data"][1]["classes"] == {str(c): int((lab == c).sum()) for c in subset}
    assert f"holds {len(subset)} of the model's 10 classes" in err


def test_empty_and_linked_class_folders(cli, tmp_path, demo_dir, small_mlp):
    """An empty class folder shifts nothing; a class folder that is a symbolic link is read."""
    full = _imagefolder(tmp_path / "full", demo_dir)
    base, _ = _acc(cli, small_mlp, full)
    odd = _imagefolder(tmp_path / "odd", demo_dir, classes={0, 1, 2, 3, 4, 5, 6, 8, 9})
    _imagefolder(tmp_path / "elsewhere", demo_dir, classes={7}, folder=None)
    (odd / "test" / "7").symlink_to(tmp_path / "elsewhere" / "7", target_is_directory=True)
    (odd / "test" / "2a_empty").mkdir()
    # "2a_empty" sorts between 2 and 3: by position every later class would move by one row
    doc, _ = _acc(cli, small_mlp, odd)
    assert doc["data"][0]["samples"] == base["data"][0]["samples"]
    assert doc["accuracy"][0][0] == pytest.approx(base["accuracy"][0][0], abs=1e-9)


def test_unknown_class_name_refused(cli, tmp_path, demo_dir, small_mlp):
    names = [str(c) for c in range(10)]
    names[3] = "cat"
    folder = _imagefolder(tmp_path / "f", demo_dir, names=names)
    r = cli("evaluate", small_mlp, "--data", folder, "--workers", "0")
    assert r.code == 4
    assert "'cat'" in r.error_line and "outside the model's 10 classes" in r.error_line
    r = cli("importance", small_mlp, "--data", folder, "--workers", "0", "-o", tmp_path / "x.safetensors")
    assert r.code == 4 and "'cat'" in r.error_line
    assert not (tmp_path / "x.safetensors").exists()


def test_checkpoint_without_names_keeps_positions_with_a_note(cli, tmp_path, demo_dir):
    a0 = tmp_path / "a0.safetensors"
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "-o", a0).code == 0
    folder = _imagefolder(tmp_path / "f", demo_dir, classes={5, 6, 7})
    doc, err = _acc(cli, a0, folder)
    assert "records no class names, so labels are matched by position" in err
    pred, _ = _predictions(a0, folder)
    lab = np.concatenate([np.full(n, k) for k, n in enumerate(doc["data"][0]["classes"].values())])
    assert doc["accuracy"][0][0] == pytest.approx(float((pred == lab).mean()), abs=1e-9)


def test_train_next_records_names_and_gives_new_classes_rows(cli, tmp_path, demo_dir):
    """Split-task protocol on class folders: A = classes a,b,c; B = d,e take unnamed rows; a 3-class head needs --grow-head."""
    from cl_tool.checkpoint import load_checkpoint

    def read_checkpoint_spec(path):
        return load_checkpoint(path).spec

    letters = list("abcdefghij")
    task_a = _imagefolder(tmp_path / "A", demo_dir, "train", classes={0, 1, 2}, names=letters, folder="train")
    task_b = _imagefolder(tmp_path / "B", demo_dir, "train", classes={3, 4}, names=letters, folder="train")
    both = _imagefolder(tmp_path / "AB", demo_dir, "test", classes={0, 1, 2, 3, 4}, names=letters)
    a0, a, b = (tmp_path / f"{n}.safetensors" for n in ("a0", "a", "b"))
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "-o", a0).code == 0
    common = ("--epochs", "1", "--workers", "0", "--device", "cpu")
    assert cli("train-next", a0, "--data", task_a, *common, "-o", a).code == 0
    assert read_checkpoint_spec(a).class_names == ["a", "b", "c"] + [None] * 7
    r = cli("train-next", a, "--data", task_b, *common, "--penalty", "none", "-o", b)
    assert r.code == 0, r.err
    assert "new classes 'd', 'e' take output rows 3, 4" in r.err
    assert read_checkpoint_spec(b).class_names == ["a", "b", "c", "d", "e"] + [None] * 5
    doc, _ = _acc(cli, b, both)
    pred, lab = _predictions(b, both)
    assert set(lab.tolist()) == {0, 1, 2, 3, 4}
    assert doc["accuracy"][0][0] == pytest.approx(float((pred == lab).mean()), abs=1e-9)

    small0, small, grown = (tmp_path / f"{n}.safetensors" for n in ("s0", "s", "g"))
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,16,3", "-o", small0).code == 0
    assert cli("train-next", small0, "--data", task_a, *common, "-o", small).code == 0
    r = cli("train-next", small, "--data", task_b, *common, "--penalty", "none", "-o", grown)
    assert r.code == 4 and "--grow-head" in r.error_line and not grown.exists()
    r = cli("train-next", small, "--data", task_b, *common, "--penalty", "none", "--grow-head", "-o", grown)
    assert r.code == 0, r.err
    spec = read_checkpoint_spec(grown)
    assert spec.num_classes == 5 and spec.class_names == ["a", "b", "c", "d", "e"]


# ----------------------------------------------------------------------------------------------- splits


def _dict(path: Path, demo_dir: Path, splits: dict[str, str]) -> Path:
    import datasets

    dd = datasets.load_from_disk(str(demo_dir))
    datasets.DatasetDict({new: dd[old] for new, old in splits.items()}).save_to_disk(str(path))
    return path


def test_evaluate_reads_the_held_out_split_and_says_so(cli, tmp_path, demo_dir, small_mlp):
    doc, err = _acc(cli, small_mlp, demo_dir)
    explicit, _ = _acc(cli, small_mlp, f"{demo_dir}::split=test")
    train, _ = _acc(cli, small_mlp, f"{demo_dir}::split=train")
    assert doc["accuracy"] == explicit["accuracy"] != train["accuracy"]
    assert doc["data"][0]["split"] == "test" and doc["data"][0]["split_default"] is True
    assert doc["data"][0]["samples"] == 400 and sum(doc["data"][0]["classes"].values()) == 400
    assert "split test (the default for evaluation" in err
    val = _dict(tmp_path / "tv", demo_dir, {"train": "train", "validation": "test"})
    doc, _ = _acc(cli, small_mlp, val)
    assert doc["data"][0]["split"] == "validation" and doc["accuracy"] == explicit["accuracy"]


def test_several_splits_without_a_default_are_refused(cli, tmp_path, demo_dir, small_mlp):
    odd = _dict(tmp_path / "odd", demo_dir, {"fold1": "train", "fold2": "test"})
    r = cli("evaluate", small_mlp, "--data", odd, "--workers", "0")
    assert r.code == 2 and "fold1, fold2" in r.error_line and "--split" in r.error_line
    r = cli("importance", small_mlp, "--data", odd, "--workers", "0", "-o", tmp_path / "i.safetensors")
    assert r.code == 2 and "fold1, fold2" in r.error_line


def test_training_and_importance_read_train(cli, tmp_path, demo_dir, small_mlp):
    out = tmp_path / "i.safetensors"
    r = cli("importance", small_mlp, "--data", demo_dir, "--workers", "0", "--json", "-o", out)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["data"]["split"] == "train" and doc["samples"] == 1200


def test_slice_beyond_the_end_is_refused(cli, demo_dir, small_mlp):
    for bad in ("test[300:900]", "test[-500:]", "test[401:]"):
        r = cli("evaluate", small_mlp, "--data", f"{demo_dir}::split={bad}", "--workers", "0")
        assert r.code == 2 and "400 rows" in r.error_line, (bad, r.err)
    doc, _ = _acc(cli, small_mlp, f"{demo_dir}::split=test[100:400]")
    assert doc["data"][0]["samples"] == 300 and doc["data"][0]["subset"] == "rows [100:400] of 400"


# ----------------------------------------------------------------------------------------------- subsets


def test_sample_draws_across_a_class_sorted_folder(cli, tmp_path, demo_dir, small_mlp):
    folder = _imagefolder(tmp_path / "f", demo_dir)
    first, err = _acc(cli, small_mlp, f"{folder}::limit=100")
    assert len(first["data"][0]["classes"]) <= 3
    assert "cover" in err and "::sample=N" in err
    drawn, err = _acc(cli, small_mlp, f"{folder}::sample=100")
    assert len(drawn["data"][0]["classes"]) == 10 and drawn["data"][0]["samples"] == 100
    assert "cover" not in err
    again, _ = _acc(cli, small_mlp, f"{folder}::sample=100")
    other, _ = _acc(cli, small_mlp, f"{folder}::sample=100,sample_seed=3")
    assert again["data"][0]["classes"] == drawn["data"][0]["classes"] != other["data"][0]["classes"]
    r = cli("evaluate", small_mlp, "--data", f"{folder}::sample=100,limit=5", "--workers", "0")
    assert r.code == 2
    r = cli("evaluate", small_mlp, "--data", f"{folder}::sample=401", "--workers", "0")
    assert r.code == 2 and "400" in r.error_line


def test_importance_samples_represent_the_task(cli, tmp_path, demo_dir, small_mlp):
    """Fisher from --samples N of a class-sorted folder is close to the full-task Fisher; the first N rows are not."""
    from cl_tool.sidecar import load_sidecar

    folder = _imagefolder(tmp_path / "f", demo_dir, "train", folder="train")
    outs = {}
    for key, extra in (
        ("full", ()),
        ("random", ("--samples", "300")),
        ("first", ("--samples", "300", "--first-samples")),
    ):
        outs[key] = tmp_path / f"{key}.safetensors"
        r = cli("importance", small_mlp, "--data", folder, "--workers", "0", "-o", outs[key], *extra)
        assert r.code == 0, r.err
    om = {k: load_sidecar(p) for k, p in outs.items()}
    flat = {k: np.concatenate([t.numpy().ravel() for t in sc.tensors.values()]) for k, sc in om.items()}

    def rel(k):
        return float(np.abs(flat[k] - flat["full"]).sum() / np.abs(flat["full"]).sum())

    assert rel("random") < 0.5 * rel("first")
    assert om["random"].data["samples"] == 300 and len(om["random"].data["classes"]) == 10
    assert "random 300 of 1,200" in om["random"].data["samples_drawn"]
    assert len(om["first"].data["classes"]) <= 4


# ----------------------------------------------------------------------------------------------- local files


def _parquet_folder(folder: Path, demo_dir: Path, relabel: bool = False) -> Path:
    dd = __import__("datasets").load_from_disk(str(demo_dir))
    folder.mkdir(exist_ok=True)
    for split in ("train", "test"):
        ds = dd[split]
        if relabel:
            ds = ds.map(lambda r: {"label": (r["label"] + 1) % 10})
        ds.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_folder_of_parquet_files_read_per_split_and_never_stale(cli, tmp_path, demo_dir, small_mlp, monkeypatch):
    """train.parquet/test.parquet are splits; a rewritten file (same size, old mtime) is read as it is now, and
    nothing is written into the datasets library's cache."""
    hf_cache = tmp_path / "hf-cache"
    hf_cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    folder = _parquet_folder(tmp_path / "pq", demo_dir)
    ref, _ = _acc(cli, small_mlp, f"{demo_dir}::split=test")
    doc, _ = _acc(cli, small_mlp, folder, extra=("--cache", "none"))
    assert doc["data"][0]["split"] == "test" and doc["accuracy"] == ref["accuracy"]
    st = os.stat(folder / "test.parquet")
    _parquet_folder(folder, demo_dir, relabel=True)
    os.utime(folder / "test.parquet", ns=(st.st_atime_ns, st.st_mtime_ns))
    doc2, _ = _acc(cli, small_mlp, folder, extra=("--cache", "none"))
    pred, lab = _predictions(small_mlp, demo_dir, "test")
    assert doc2["accuracy"][0][0] == pytest.approx(float((pred == (lab + 1) % 10).mean()), abs=1e-9)
    assert not any(hf_cache.rglob("*.arrow"))


def test_single_file_and_json_lines(cli, tmp_path, demo_dir, small_mlp):
    ds = _demo_split(demo_dir, "test")
    ds.to_parquet(str(tmp_path / "t.parquet"))
    doc, _ = _acc(cli, small_mlp, tmp_path / "t.parquet")
    ref, _ = _acc(cli, small_mlp, f"{demo_dir}::split=test")
    assert doc["accuracy"] == ref["accuracy"]
    rows = [{"pixels": np.asarray(r["image"]).ravel().tolist(), "label": r["label"]} for r in ds.select(range(50))]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "t.json").write_text(json.dumps(rows))
    a, _ = _acc(cli, small_mlp, tmp_path / "t.jsonl")
    b, _ = _acc(cli, small_mlp, tmp_path / "t.json")
    c, _ = _acc(cli, small_mlp, f"{demo_dir}::split=test[:50]")
    assert a["accuracy"] == b["accuracy"] == c["accuracy"]


# ----------------------------------------------------------------------------------------------- odd inputs


def test_every_image_bad_is_an_error(cli, tmp_path, small_mlp):
    for c in "0123":
        (tmp_path / "bad" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "bad" / c / f"{i}.png").write_bytes(b"not a png")
    r = cli("evaluate", small_mlp, "--data", tmp_path / "bad", "--workers", "0", "--skip-bad-images", "--cache", "none")
    assert r.code == 3 and "None of the images" in r.error_line and "12 skipped" in r.error_line
    r = cli(
        "train-next",
        small_mlp,
        "--data",
        tmp_path / "bad",
        "--workers",
        "0",
        "--skip-bad-images",
        "--cache",
        "none",
        "-o",
        tmp_path / "o.safetensors",
    )
    assert r.code == 3 and "None of the images" in r.error_line
    assert not (tmp_path / "o.safetensors").exists()


def test_images_outside_class_folders_and_mixed_split_folders(cli, tmp_path, demo_dir, small_mlp):
    folder = _imagefolder(tmp_path / "f", demo_dir, classes={1, 2})
    (folder / "extra").mkdir()
    r = cli("evaluate", small_mlp, "--data", folder, "--workers", "0")
    assert r.code == 3 and "extra" in r.error_line
    loose = _imagefolder(tmp_path / "g", demo_dir, classes={1}, folder=None)
    next((loose / "1").iterdir()).rename(loose / "loose.png")
    r = cli("evaluate", small_mlp, "--data", loose, "--workers", "0")
    assert r.code == 3 and "loose.png" in r.error_line and "class folder" in r.error_line
