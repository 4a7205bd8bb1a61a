"""Every experiment config in sample_configs/experiments runs as documented (tiny data, overridden sizes)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((ROOT / "sample_configs" / "experiments").glob("*.toml"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    import datasets

    from cl_tool.demo import make_dataset

    datasets.disable_progress_bars()
    path = tmp_path_factory.mktemp("tiny") / "ds"
    make_dataset(96, seed=4).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_runs(config, tiny_data, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import reproduce

    text = config.read_text()
    assert text.startswith("# Reproduces"), "each config says what it reproduces"
    out = tmp_path / "out"
    overrides = [
        "--set",
        "train.epochs=1",
        "--set",
        'data.train-split="[:64]"',
        "--set",
        'data.test-split="[64:]"',
        "--set",
        "importance.samples=32",
        "--set",
        "seeds=[0]",
        "--set",
        "best-seeds=[]",
    ]
    if "\n[prune]" in text:
        overrides += ["--set", 'prune.sweep="0.5,0.9"']
    results = reproduce.main(
        [str(config), "--data", str(tiny_data), "--out", str(out), "--max-lambdas", "1", *overrides]
    )
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["runs"]] == [r["name"] for r in results["runs"]]
    for run in saved["runs"]:
        for entry in run["sweep"]:
            assert "diverged" in entry or len(entry["accuracy"]) == len(saved["config"]["data"]["tasks"])
    assert (out / "results.md").read_text().startswith("### ")
    if "prune" in saved:
        for name in saved["prune"]["runs"]:
            assert set(saved["prune"]["curves"][name]) == set(saved["config"]["prune"]["by"])
    rendered = reproduce.main([str(out / "results.json"), "--render"])  # every table again from the stored JSON
    assert (out / "results.md").read_text() == reproduce.markdown(saved) == reproduce.markdown(rendered)


def test_readme_shows_how_to_get_mnist_and_no_build_machine_paths():
    for doc in [ROOT / "README.md", *EXPERIMENTS]:
        assert "shared/data" not in doc.read_text(encoding="utf-8"), doc
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "ylecun/mnist" in text and "t10k-images-idx3-ubyte.gz" in text


def test_benchmark_scripts_take_a_dataset_or_an_idx_folder(tmp_path):
    """The reproduction scripts accept a dataset with MNIST's splits (test split) and an IDX folder (converted once)."""
    import gzip
    import struct

    import datasets
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    from _mnist import mnist_arrays, mnist_source

    images = (np.arange(6 * 28 * 28) % 251).astype(np.uint8).reshape(6, 28, 28)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    idx = tmp_path / "idx"
    idx.mkdir()
    with gzip.open(idx / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, 6, 28, 28) + images.tobytes())
    with gzip.open(idx / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">II", 2049, 6) + labels.tobytes())
    data, prefix = mnist_source(str(idx), tmp_path / "work")
    assert prefix == "" and len(datasets.load_from_disk(data)) == 6
    from PIL import Image

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    test = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a, mode="L") for a in images], "label": labels.tolist()}, features=feats
    )
    datasets.DatasetDict({"train": test.select([0]), "test": test}).save_to_disk(str(tmp_path / "hub_copy"))
    assert mnist_source(str(tmp_path / "hub_copy"), tmp_path / "work") == (str(tmp_path / "hub_copy"), "test")
    for source in (idx, tmp_path / "hub_copy"):
        got_images, got_labels = mnist_arrays(str(source))
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


STORED = sorted(
    p for p in (ROOT / "tests" / "benchmarks" / "results").glob("*.json") if "config" in json.loads(p.read_text())
)


@pytest.mark.parametrize("stored", STORED, ids=lambda p: p.stem)
def test_stored_results_render_again(stored, tmp_path):
    """The README's tables come from these JSON files: `reproduce.py NAME.json --render` regenerates NAME.md."""
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import reproduce

    copy = tmp_path / stored.name
    copy.write_bytes(stored.read_bytes())
    results = reproduce.main([str(copy), "--render"])
    md = (tmp_path / f"{stored.stem}.md").read_text()
    assert md == reproduce.markdown(results) and md.startswith("### ")
    assert not (tmp_path / "results.md").exists()
