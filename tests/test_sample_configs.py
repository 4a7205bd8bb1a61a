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
    overrides = ["--set", "train.epochs=1", "--set", 'data.train-split="[:64]"', "--set", 'data.test-split="[64:]"',
                 "--set", "importance.samples=32"]
    if "\n[prune]" in text:
        overrides += ["--set", 'prune.sweep="0.5,0.9"']
    results = reproduce.main([str(config), "--data", str(tiny_data), "--out", str(out), "--max-lambdas", "1", *overrides])
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["runs"]] == [r["name"] for r in results["runs"]]
    for run in saved["runs"]:
        for entry in run["sweep"]:
            assert "diverged" in entry or len(entry["accuracy"]) == len(saved["config"]["data"]["tasks"])
    assert (out / "results.md").read_text().startswith("### ")
    if "prune" in saved:
        assert set(saved["prune"]["curves"]) == set(saved["config"]["prune"]["by"])
