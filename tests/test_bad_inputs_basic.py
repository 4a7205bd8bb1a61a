"""Issue 2's bad inputs: one clear sentence, a non-zero exit code, no output file left behind."""

import json
import struct

import pytest

from tests.conftest import snapshot_dir


@pytest.fixture
def ws(tmp_path, small_mlp):
    import shutil

    ck = tmp_path / "m.safetensors"
    shutil.copy(small_mlp, ck)
    return tmp_path, ck


def _no_new_files(folder, before):
    after = snapshot_dir(folder)
    assert after == before, set(after) ^ set(before)


def test_missing_input_file(cli, ws, demo_dir):
    d, _ = ws
    before = snapshot_dir(d)
    r = cli("train-next", d / "nope.safetensors", "--data", demo_dir, "-o", d / "o.safetensors", "--device", "cpu")
    assert r.code == 3 and "does not exist" in r.error_line and "nope.safetensors" in r.error_line
    assert "Traceback" not in r.err
    _no_new_files(d, before)


def test_not_a_safetensors_file(cli, ws, demo_dir):
    d, _ = ws
    bad = d / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all, just text\n" * 3)
    before = snapshot_dir(d)
    r = cli("evaluate", bad, "--data", demo_dir, "--device", "cpu")
    assert r.code == 3 and "not a safetensors file" in r.error_line
    _no_new_files(d, before)


def test_truncated_file(cli, ws):
    d, ck = ws
    trunc = d / "trunc.safetensors"
    trunc.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    before = snapshot_dir(d)
    r = cli("prune", trunc, "--by", "magnitude", "--sparsity", "0.5", "-o", d / "p.safetensors")
    assert r.code == 3 and "truncated" in r.error_line
    _no_new_files(d, before)


def test_sidecar_of_another_checkpoint(cli, ws, demo_dir):
    d, ck = ws
    other = d / "other.safetensors"
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "--seed", "5", "-o", other).code == 0
    assert cli("importance", other, "--method", "magnitude", "-o", d / "m.importance.safetensors").code == 0
    before = snapshot_dir(d)
    r = cli("train-next", ck, "--data", demo_dir, "-o", d / "b.safetensors", "--device", "cpu")
    assert r.code == 4 and "belongs to another checkpoint" in r.error_line
    _no_new_files(d, before)


def test_dataset_without_label_column(cli, ws, tmp_path):
    import datasets

    from cl_tool.demo import make_dataset

    d, ck = ws
    ds = make_dataset(20).remove_columns("label")
    ds.save_to_disk(str(tmp_path / "nolabel"))
    before = snapshot_dir(d)
    r = cli("importance", ck, "--data", tmp_path / "nolabel", "-o", d / "i.safetensors", "--device", "cpu")
    assert r.code == 3 and "no label column" in r.error_line and "--label-column" in r.error_line
    _no_new_files(d, before)


def test_labels_outside_model_classes(cli, ws, tmp_path):
    from cl_tool.demo import make_dataset

    d, ck = ws
    make_dataset(30, classes=15, seed=2).save_to_disk(str(tmp_path / "fifteen"))
    before = snapshot_dir(d)
    r = cli("evaluate", ck, "--data", tmp_path / "fifteen", "--device", "cpu")
    assert r.code == 4 and "outside the model's 10 classes" in r.error_line
    _no_new_files(d, before)


def test_sparsity_out_of_range(cli, ws):
    d, ck = ws
    before = snapshot_dir(d)
    r = cli("prune", ck, "--by", "magnitude", "--sparsity", "1.5", "-o", d / "p.safetensors")
    assert r.code == 2 and "--sparsity must be in [0, 1)" in r.error_line
    _no_new_files(d, before)


def test_existing_output_without_force(cli, ws):
    d, ck = ws
    out = d / "exists.safetensors"
    out.write_bytes(b"precious")
    before = snapshot_dir(d)
    r = cli("prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", out)
    assert r.code == 6 and "--force" in r.error_line
    _no_new_files(d, before)
    r = cli("prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", out, "--force")
    assert r.code == 0 and out.read_bytes() != b"precious"


def test_missing_relative_data_folder_is_a_path_not_a_hub_id(cli, ws, monkeypatch):
    """`runs/task_b` looks like a hub id (owner/name), but ./runs exists here: it is a missing path (exit 3)."""
    d, ck = ws
    (d / "runs").mkdir()
    monkeypatch.chdir(d)
    before = snapshot_dir(d)
    r = cli("evaluate", ck, "--data", "runs/task_b", "--device", "cpu")
    assert r.code == 3, r.err
    assert "runs/task_b does not exist" in r.error_line and "Hub" not in r.error_line
    _no_new_files(d, before)
