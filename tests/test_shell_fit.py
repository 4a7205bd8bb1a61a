"""Fitting the shell: a mistyped data name fails at once, the decoded cache's housekeeping, choosing λ in one run."""

from __future__ import annotations

import json

import pytest


def test_a_mistyped_data_name_fails_at_once_without_the_hub(cli, small_mlp, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub cannot be reached
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the datasets library was asked"))
    r = cli("evaluate", small_mlp, "--data", "mnist_pngz", "--device", "cpu")
    assert r.code == 7 and r.err.splitlines() == [r.error_line]  # one sentence, no retry lines
    assert "--data mnist_pngz is not a local file or folder" in r.error_line
    assert "http://127.0.0.1:9" in r.error_line
    r = cli("evaluate", small_mlp, "--data", "./mnist_pngz", "--device", "cpu")  # looks like a path
    assert r.code == 3 and "does not exist; check the path" in r.error_line


def test_offline_mode_asks_only_the_local_copy(cli, small_mlp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = cli("evaluate", small_mlp, "--data", "mnist_pngz", "--device", "cpu")
    assert r.code == 7 and r.err.splitlines() == [r.error_line]
    assert "Hugging Face Hub cannot be reached" in r.error_line


def _cached(cli, ckpt, data, folder):
    r = cli("evaluate", ckpt, "--data", data, "--device", "cpu", "--cache-dir", folder)
    assert r.code == 0, r.err


def test_cache_lists_clears_by_age_and_evicts_the_least_recently_used(cli, small_mlp, demo_dir, tmp_path, monkeypatch):
    import os
    import time

    folder = tmp_path / "cache"
    monkeypatch.setenv("CL_TOOL_CACHE", str(folder))
    for n in (40, 60):
        _cached(cli, small_mlp, f"{demo_dir}::limit={n}", folder)
    r = cli("cache", "--json")
    listing = json.loads(r.out)
    assert r.code == 0 and listing["folder"] == str(folder) and len(listing["files"]) == 2
    assert sorted(f["rows"] for f in listing["files"]) == [40, 60]
    assert {f["source"] for f in listing["files"]} == {str(demo_dir.resolve())}
    sizes = {f["rows"]: f["bytes"] for f in listing["files"]}
    assert listing["total_bytes"] == sum(sizes.values()) == sum(p.stat().st_size for p in folder.glob("*.cltd"))
    human = cli("cache")
    assert str(demo_dir.resolve()) in human.out and "total: 2 file(s)" in human.out  # the result: stdout

    by_rows = {f["rows"]: folder / f["file"] for f in listing["files"]}
    old = time.time() - 10 * 86400
    os.utime(by_rows[40], (old, old))  # last used ten days ago
    r = cli("cache", "--older-than", "7d", "--json")
    assert [f["rows"] for f in json.loads(r.out)["files"]] == [40] and by_rows[40].exists()  # listing removes nothing
    _cached(cli, small_mlp, f"{demo_dir}::limit=60", folder)  # a hit marks the file used now
    assert time.time() - by_rows[60].stat().st_mtime < 3600
    r = cli("cache", "--clear", "--older-than", "7d", "--json")
    assert [f["rows"] for f in json.loads(r.out)["removed"]] == [40]
    assert not by_rows[40].exists() and by_rows[60].exists()

    # the cap: writing a third file leaves room for it and one more; the least recently used one goes
    _cached(cli, small_mlp, f"{demo_dir}::limit=40", folder)
    os.utime(by_rows[60], (old, old))
    monkeypatch.setenv("CL_TOOL_CACHE_MAX", str(sizes[40] + sizes[60] + 1000))
    _cached(cli, small_mlp, f"{demo_dir}::limit=50", folder)
    rows = sorted(f["rows"] for f in json.loads(cli("cache", "--json").out)["files"])
    assert rows == [40, 50] and not by_rows[60].exists()
    r = cli("cache", "--max", "1", "--json")  # trim now, down to one byte: nothing stays
    assert len(json.loads(r.out)["removed"]) == 2 and not list(folder.glob("*.cltd"))
    r = cli("cache", "--clear", "--older-than", "soon")
    assert r.code == 2 and "--older-than 'soon' is not a duration" in r.error_line
