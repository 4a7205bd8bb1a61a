"""The same rule for the same fault: sidecar entries, the cache folder, worker and shift limits, torch's errors in
convert, line continuations in a batch file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir

# ------------------------------------------------------------------------------------------------ sidecar entries


def _edited_sidecar(anchored: Path, dest: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = anchored.with_name(anchored.name.replace(".safetensors", ".importance.safetensors"))
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    edit(tensors)
    save_file(tensors, str(dest), metadata=meta)
    return dest


@pytest.mark.parametrize("fault", ["an extra entry", "a missing entry"])
def test_every_reader_of_a_sidecar_gives_exit_4_for_entries_that_do_not_fit(cli, anchored, tmp_path, demo_dir, fault):
    import torch

    d = tmp_path / "ws"
    d.mkdir()
    ck = d / "a.safetensors"
    shutil.copy(anchored, ck)

    def edit(t):
        if fault == "an extra entry":
            t["extra.weight"] = torch.ones(3)
        else:
            del t[sorted(t)[0]]

    sc = _edited_sidecar(anchored, d / "edited.importance.safetensors", edit)
    data = f"{demo_dir}::limit=8"
    commands = {
        "prune (streaming)": [
            "prune",
            ck,
            "--by",
            "importance",
            "--importance",
            sc,
            "--sparsity",
            "0.5",
            "-o",
            d / "p",
        ],
        "prune --sweep (in memory)": [
            *("prune", ck, "--by", "importance", "--importance", sc, "--sweep", "0.5"),
            *("--data", data, "--device", "cpu"),
        ],
        "train-next": ["train-next", ck, "--data", data, "--importance", sc, "--device", "cpu", "-o", d / "b"],
    }
    before = snapshot_dir(d)
    phrase = "has an entry for 'extra.weight'" if fault == "an extra entry" else "has no entry for parameter"
    for name, argv in commands.items():
        r = cli(*argv)
        assert r.code == 4, f"{name}: {r.err}"
        assert phrase in r.error_line and "recompute it for this checkpoint" in r.error_line, f"{name}: {r.error_line}"
        assert "Traceback" not in r.err
        assert snapshot_dir(d) == before


# ------------------------------------------------------------------------------------------------ the cache folder


def _timm_like(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("where", ["the model folder", "a folder inside it", "a file"])
def test_the_cache_folder_is_never_a_model_folder_or_a_file(cli, ws, demo_dir, tmp_path, where):
    d, ck = ws
    model = _timm_like(tmp_path / "timm_model")
    (model / "sub").mkdir()
    target = {"the model folder": model, "a folder inside it": model / "sub", "a file": model / "config.json"}[where]
    before = snapshot_dir(model)
    r = cli("evaluate", ck, "--data", f"{demo_dir}::limit=8", "--device", "cpu", "--cache-dir", target)
    assert r.code == 6, r.err
    assert ("is a file, not a folder" if where == "a file" else "inside the model folder") in r.error_line
    assert snapshot_dir(model) == before and sorted(p.name for p in (model / "sub").iterdir()) == []


@pytest.mark.parametrize("form", [["--cache-dir", ""], ["--cache-dir="], ["--config", "cfg.toml"]])
def test_an_empty_cache_dir_is_refused_not_the_current_folder(cli, ws, demo_dir, tmp_path, form):
    d, ck = ws
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "cfg.toml").write_text('cache-dir = ""\n')
    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = cli("evaluate", ck, "--data", f"{demo_dir}::limit=8", "--device", "cpu", *form)
    finally:
        os.chdir(old)
    assert r.code == 2, r.err
    assert "empty path" in r.error_line and "Traceback" not in r.err
    assert sorted(p.name for p in cwd.iterdir()) == ["cfg.toml"]


def test_cache_disk_that_cannot_write_says_so(cli, ws, demo_dir, tmp_path, monkeypatch):
    import cl_tool.data.cache as cache

    d, ck = ws
    monkeypatch.setattr(cache, "space_for", lambda folder, nbytes, reserve: False)  # the file cannot be made
    folder = tmp_path / "cache"
    argv = ["evaluate", ck, "--data", f"{demo_dir}::limit=16", "--device", "cpu", "--json"]
    r = cli(*argv, "--cache", "disk", "--cache-dir", folder)
    assert r.code == 0, r.err
    assert "the decoded-image cache file was not written (cannot create a cache file in" in r.err
    assert "kept in memory for this command only" in r.err
    assert list(folder.iterdir()) == []
    plain = cli(*argv, "--cache", "none")
    assert json.loads(r.out)["accuracy"] == json.loads(plain.out)["accuracy"]  # same numbers, only not cached


# ------------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize("workers", ["65", "1000"])
def test_too_many_workers_is_a_usage_error(cli, ws, demo_dir, workers):
    d, ck = ws
    r = cli("evaluate", ck, "--data", f"{demo_dir}::limit=8", "--device", "cpu", "--workers", workers)
    assert r.code == 2 and "--workers must be in [0, 64]" in r.error_line, r.err


@pytest.mark.parametrize("k", [14, 28, 1000])
def test_a_shift_of_half_the_image_or_more_is_refused(cli, ws, demo_dir, k):
    d, ck = ws
    r = cli(
        "train-next", ck, "--data", f"{demo_dir}::limit=8", "--device", "cpu", "--augment", f"shift={k}", "-o", d / "b"
    )
    assert r.code == 2, r.err
    assert f"shift={k}" in r.error_line and "28x28" in r.error_line and "below 14" in r.error_line
    assert not (d / "b").exists()


def test_shift_limit_is_below_half_the_smaller_side():
    from cl_tool.data.transforms import check_augment_fits, parse_augment
    from cl_tool.errors import UsageError

    check_augment_fits(parse_augment("shift=13"), (1, 28, 28))
    check_augment_fits(parse_augment("shift=2"), (3, 5, 224))
    check_augment_fits(parse_augment("none"), (1, 2, 2))
    with pytest.raises(UsageError):
        check_augment_fits(parse_augment("shift=3"), (3, 5, 224))


# ------------------------------------------------------------------------------------------------ convert's error


def test_convert_quotes_torchs_reason_in_whole_sentences(tmp_path):
    import pickle

    import torch

    from cl_tool.workflows.convert import torch_reason

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError) as exc:
        torch.load(tmp_path / "evil.bin", weights_only=True)
    reason = torch_reason(exc.value)
    assert reason.startswith("Trying to load unsupported GLOBAL") and reason.endswith("is blocked")
    assert "weights_only` set to `False`" not in reason
    long = torch_reason(RuntimeError("First sentence here. " * 20))
    assert len(long) <= 202 and long.endswith("First sentence here …")
    assert torch_reason(RuntimeError("word " * 100)).endswith("word …")


# ------------------------------------------------------------------------------------------------ batch continuations


def test_batch_lines_continue_after_a_backslash(cli, tmp_path):
    out = tmp_path / "a.safetensors"
    seq = tmp_path / "seq.txt"
    seq.write_text(
        "# a comment ending in a backslash does not continue \\\n"
        f"init --arch mlp \\\n    --arch-arg sizes=784,8,10 \\\n    -o {out}\n"
        f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path / 'x'} --bogus \\\\\n"
    )
    r = cli("batch", seq)
    assert out.is_file()
    assert r.code == 2  # the second command (line 5, its escaped backslash ends it) has an unknown option
    assert "[1/2]" in r.err and "[2/2]" in r.err and "--bogus" in r.error_line


def test_joined_lines_numbers_each_command_by_its_first_line():
    from cl_tool.cli.batch import joined_lines

    assert joined_lines("a \\\nb\nc\n# d \\\ne \\") == [(1, "a b"), (3, "c"), (4, "# d \\"), (5, "e ")]
