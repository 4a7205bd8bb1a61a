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
