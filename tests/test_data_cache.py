"""The decoded cache: reused by a later command without decoding, keyed by content, atomic, safe with concurrent writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_tool.data import Preprocess, TaskSpec, open_task
from cl_tool.errors import OutputError
from tests._data_util import collect, imagefolder, saved_demo
from tests._legacy_load_task import load_task
from tests.conftest import snapshot_dir

NORM = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
PRE = Preprocess.builtin((3, 16, 16), *NORM)
ROOT = Path(__file__).resolve().parents[1]


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def folder(tmp_path):
    return imagefolder(tmp_path / "data", per_class=6)


def test_second_open_reads_the_cache_without_opening_the_source(folder, tmp_path):
    before = snapshot_dir(folder)
    first = open_task(
        TaskSpec(str(folder), invert=True), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c", ram_budget=0
    )
    _, x1, y1 = collect(first, batch_size=5)
    first.close()
    assert first.stats["decoded"] == len(first) and len(cache_files(tmp_path / "c")) == 1
    second = open_task(
        TaskSpec(str(folder), invert=True), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c", ram_budget=0
    )
    assert second._sel is None  # the source was not opened
    _, x2, y2 = collect(second, batch_size=5)
    assert second.stats["decoded"] == 0 and second.cache == "disk"  # read per batch (pread), not loaded whole
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x2, load_task(TaskSpec(str(folder), invert=True), (3, 16, 16), *NORM).x)
    second.close()
    assert snapshot_dir(folder) == before  # nothing written into the data folder


def test_cache_is_shared_by_task_transforms_and_commands(folder, tmp_path):
    """The cache holds pixels before task transforms: --permute/--rotate tasks of the same source decode once."""
    a = open_task(TaskSpec(str(folder)), PRE, cache="auto", workers=0, cache_dir=tmp_path / "c")
    collect(a, batch_size=8)
    a.close()
    b = open_task(TaskSpec(str(folder), permute=5, rotate=90.0), PRE, cache="auto", workers=2, cache_dir=tmp_path / "c")
    _, x, _ = collect(b, batch_size=8)
    assert b.stats["decoded"] == 0
    assert torch.equal(x, load_task(TaskSpec(str(folder), permute=5, rotate=90.0), (3, 16, 16), *NORM).x)
    b.close()


def test_a_cache_hit_imports_no_datasets(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CL_TOOL_CACHE": str(tmp_path / "c"), "HF_DATASETS_OFFLINE": "1"}
    code = textwrap.dedent(f"""
        import sys
        from cl_tool.data import Preprocess, TaskSpec, open_task
        t = open_task(TaskSpec({str(folder)!r}), Preprocess.builtin((3, 16, 16), (0.5,) * 3, (0.2,) * 3), workers=0)
        n = sum(len(b.index) for b in t.batches(batch_size=7))
        print("decoded", t.stats["decoded"], "datasets" in sys.modules, n)
    """)
    out = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    assert out[0].stdout.split() == ["decoded", "18", "True", "18"], out[0].stderr
    assert out[1].stdout.split() == ["decoded", "0", "False", "18"], out[1].stderr


def test_changed_file_changes_the_key(folder, tmp_path):
    from PIL import Image

    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    _, x1, _ = collect(t, batch_size=6)
    t.close()
    target = folder / "b" / "2.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(target)
    t2 = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    _, x2, _ = collect(t2, batch_size=6)
    assert t2.stats["decoded"] == len(t2) and len(cache_files(tmp_path / "c")) == 2
    assert not torch.equal(x1, x2) and torch.equal(x2, load_task(TaskSpec(str(folder)), (3, 16, 16), *NORM).x)
    t2.close()
    other_size = open_task(
        TaskSpec(str(folder)), Preprocess.builtin((3, 8, 8), *NORM), cache="disk", workers=0, cache_dir=tmp_path / "c"
    )
    assert other_size._sel is not None  # another geometry is another key
    other_size.close()


def test_partial_or_interrupted_first_pass_leaves_no_cache(folder, tmp_path):
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=2, cache_dir=tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(t.batches(batch_size=4)):
            if i == 2:
                raise KeyboardInterrupt
    t.close()
    assert cache_files(tmp_path / "c") == []
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    collect(t, order=[[0, 1, 2]])  # e.g. importance --samples 3: a part of the task
    t.close()
    assert cache_files(tmp_path / "c") == []


def test_rows_decoded_by_earlier_passes_are_not_decoded_again(folder, tmp_path):
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c", ram_budget=0)
    collect(t, order=[[0, 1, 2, 3], [4, 5]])
    assert t.stats["decoded"] == 6 and cache_files(tmp_path / "c")[0].startswith(".cl-tool-tmp-")
    idx, x, _ = collect(t, batch_size=5)  # the rest is decoded, rows 0-5 are read back from the unfinished file
    assert t.stats["decoded"] == len(t) and [n for n in cache_files(tmp_path / "c") if n.endswith(".cltd")]
    assert torch.equal(x, load_task(TaskSpec(str(folder)), (3, 16, 16), *NORM).x)
    t.close()


WRITER = textwrap.dedent("""
    import sys, time
    from cl_tool.data import Preprocess, TaskSpec, open_task
    t = open_task(TaskSpec(sys.argv[1]), Preprocess.builtin((3, 16, 16), (0.5,) * 3, (0.2,) * 3), cache="disk", workers=0,
                  cache_dir=sys.argv[2], ram_budget=0)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i, b in enumerate(t.batches(batch_size=3)):
        time.sleep(float(sys.argv[3]))
    print("done", t.stats["decoded"], flush=True)
""")


def _writer(folder, cache, delay):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), str(cache), str(delay)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_writers_leave_one_valid_cache(folder, tmp_path):
    procs = [_writer(folder, tmp_path / "c", 0.2) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    for p in procs:  # both write their temporary files at the same time (6 batches of 0.2 s each)
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o[0].split()[-2:] == ["done", "18"] for o in outs), (
        outs
    )  # both decoded everything: neither saw a half-written file
    names = cache_files(tmp_path / "c")
    assert len(names) == 1 and names[0].endswith(".cltd")  # one file, no temporaries
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    _, x, _ = collect(t, batch_size=4)
    assert t.stats["decoded"] == 0 and torch.equal(x, load_task(TaskSpec(str(folder)), (3, 16, 16), *NORM).x)
    t.close()


def test_a_killed_writer_leaves_only_a_temporary_that_the_next_writer_removes(folder, tmp_path):
    p = _writer(folder, tmp_path / "c", 2.0)
    assert p.stdout.readline().strip() == "ready"
    p.stdin.write("go\n")
    p.stdin.flush()
    deadline = time.time() + 60
    while not cache_files(tmp_path / "c") and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    names = cache_files(tmp_path / "c")
    assert len(names) == 1 and names[0].startswith(".cl-tool-tmp-")  # never a final file from an unfinished pass
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    collect(t, batch_size=6)
    t.close()
    names = cache_files(tmp_path / "c")
    assert len(names) == 1 and names[0].endswith(".cltd")


def test_damaged_cache_file_is_ignored_and_replaced(folder, tmp_path):
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    _, x, _ = collect(t, batch_size=6)
    t.close()
    (path,) = (tmp_path / "c").iterdir()
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 10)
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    _, x2, _ = collect(t, batch_size=6)
    assert t.stats["decoded"] == len(t) and torch.equal(x, x2)
    t.close()
    t = open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=tmp_path / "c")
    assert t._sel is None
    t.close()


def test_auto_budget_and_unwritable_folder(folder, tmp_path):
    small = open_task(TaskSpec(str(folder)), PRE, cache="auto", workers=0, cache_dir=tmp_path / "c")
    assert small.cache == "ram"
    small.close()
    big = open_task(TaskSpec(str(folder)), PRE, cache="auto", workers=0, cache_dir=tmp_path / "d", ram_budget=100)
    _, x, _ = collect(big, batch_size=6)
    assert big.cache == "disk" and big._store.ram is None  # over the budget: read back per batch, never held whole
    big.close()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    unwritable = blocker / "cache"  # cannot be created, whoever runs the test
    with pytest.raises(OutputError, match="not writable"):
        open_task(TaskSpec(str(folder)), PRE, cache="disk", workers=0, cache_dir=unwritable)
    t = open_task(TaskSpec(str(folder)), PRE, cache="auto", workers=0, cache_dir=unwritable)  # auto: falls back to RAM
    assert t.cache == "ram"
    t.close()


def test_none_bypasses_the_cache(folder, tmp_path):
    t = open_task(TaskSpec(str(folder)), PRE, cache="none", workers=0, cache_dir=tmp_path / "c")
    collect(t, batch_size=6)
    collect(t, batch_size=6)
    assert t.stats["decoded"] == 2 * len(t) and cache_files(tmp_path / "c") == []
    t.close()


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from cl_tool.data import default_cache_dir

    monkeypatch.setenv("CL_TOOL_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CL_TOOL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cl-tool" / "decoded"


def test_saved_dataset_rewritten_changes_the_key(tmp_path):
    import shutil

    path = saved_demo(tmp_path / "demo", n=10)
    pre = Preprocess.builtin((1, 28, 28), (0.0,), (1.0,))
    t = open_task(TaskSpec(str(path)), pre, cache="disk", workers=0, cache_dir=tmp_path / "c")
    collect(t, batch_size=5)
    t.close()
    shutil.rmtree(path)
    saved_demo(path, n=10, seed=3)
    t = open_task(TaskSpec(str(path)), pre, cache="disk", workers=0, cache_dir=tmp_path / "c")
    _, x, _ = collect(t, batch_size=5)
    assert t.stats["decoded"] == 10 and torch.equal(x, load_task(TaskSpec(str(path)), (1, 28, 28), (0.0,), (1.0,)).x)
    t.close()


def test_a_cache_folder_inside_the_data_folder_is_refused(cli, tmp_path):
    """The decoded cache is never written into a data folder: exit 6 naming both, and nothing is written."""
    import json as _json

    from cl_tool.demo import make_dataset

    data = tmp_path / "data"
    make_dataset(40, seed=1).save_to_disk(str(data))
    ckpt = tmp_path / "m.safetensors"
    assert cli("init", "--arch", "mlp", "-o", ckpt).code == 0
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    r = cli("evaluate", ckpt, "--data", data, "--cache-dir", data / "cache", "--json")
    assert (
        r.code == 6 and "--cache-dir" in r.error_line and str(data) in r.error_line and "\n" not in r.error_line.strip()
    )
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    r = cli("evaluate", ckpt, "--data", data, "--cache-dir", data / "cache", "--cache", "none", "--json")
    assert r.code == 0 and _json.loads(r.out)["accuracy"]
