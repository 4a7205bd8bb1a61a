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


# ----------------------------------------------------------------------------------------------- current data


def _bmp_folder(root: Path, n: int = 6) -> Path:
    """Two classes of same-size 16x16 RGB BMPs (uncompressed: equal file sizes), distinct pixels each."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for c in "ab":
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.bmp")
    return root


def _swap_keeping_size_and_mtime(a: Path, b: Path, how: str) -> None:
    """Exchange two files' contents; size and mtime stay as they were (as tar --mtime, cp -p, rsync -a leave them)."""
    sa, sb = a.stat(), b.stat()
    assert sa.st_size == sb.st_size
    if how == "rewrite":  # same inodes, new contents
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
    else:  # "rename": the files trade places (new inodes at each path)
        tmp = a.with_name("swap.tmp")
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)
    os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
    os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))


def _read(path, cache_dir, cache="disk", **kw):
    t = open_task(TaskSpec(str(path)), PRE, cache=cache, workers=0, cache_dir=cache_dir, **kw)
    with t:
        _, x, y = collect(t, batch_size=5)
    return x, y, t


@pytest.mark.parametrize("how", ["rewrite", "rename"])
def test_swapped_images_with_restored_size_and_mtime_are_read_anew(tmp_path, how):
    data = _bmp_folder(tmp_path / "data")
    a, b = data / "a" / "0.bmp", data / "b" / "3.bmp"
    x1, y1, _ = _read(data, tmp_path / "c")
    _swap_keeping_size_and_mtime(a, b, how)
    x2, y2, t2 = _read(data, tmp_path / "c")
    x3, y3, _ = _read(data, tmp_path / "none", cache="none")
    assert t2.stats["decoded"] == len(t2)  # not served from the first cache file
    assert torch.equal(x2, x3) and torch.equal(y2, y3) and torch.equal(y1, y2)
    ia, ib = 0, 6 + 3  # rows of a/0.bmp and b/3.bmp (class a first)
    assert torch.equal(x2[ia], x1[ib]) and torch.equal(x2[ib], x1[ia])  # the pixels moved with the content
    rest = [i for i in range(len(x1)) if i not in (ia, ib)]
    assert torch.equal(x2[rest], x1[rest])


def test_the_signature_follows_links_and_sees_restored_files(tmp_path):
    """Files reached through symlinked class folders count; a link cycle ends; every restore that leaves size and mtime changes it."""
    import shutil

    from cl_tool.data.sources import local_signature

    real = _bmp_folder(tmp_path / "real", n=2)
    data = tmp_path / "data"
    data.mkdir()
    for c in "ab":
        (data / c).symlink_to(real / c, target_is_directory=True)
    (real / "a" / "loop").symlink_to(data, target_is_directory=True)  # a cycle back to the top
    (data / "b" / "gone.bmp").symlink_to(tmp_path / "missing.bmp")  # a dangling link
    seen = {local_signature(str(data))}
    assert local_signature(str(data)) in seen  # stable while nothing changes
    a, b = real / "a" / "0.bmp", real / "b" / "1.bmp"
    _swap_keeping_size_and_mtime(a, b, "rewrite")  # content behind a linked folder
    seen.add(local_signature(str(data)))
    _swap_keeping_size_and_mtime(a, b, "rename")
    seen.add(local_signature(str(data)))
    backup = tmp_path / "backup.bmp"
    shutil.copy2(b, backup)  # cp -p of a same-size file over another: size and mtime as before
    st = a.stat()
    shutil.copyfile(backup, a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen.add(local_signature(str(data)))
    (tmp_path / "missing.bmp").write_bytes(b.read_bytes())  # the dangling link now points at a file
    seen.add(local_signature(str(data)))
    assert len(seen) == 5
    single = tmp_path / "one.parquet"
    single.write_bytes(b"x" * 1000)
    st = single.stat()
    before = local_signature(str(single))
    single.write_bytes(b"y" * 1000)
    os.utime(single, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert local_signature(str(single)) != before


def test_a_replaced_parquet_file_with_restored_mtime_is_not_served_from_the_cache(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)

    def write(path, pixels):
        datasets.Dataset.from_dict({"pixels": pixels.tolist(), "label": [0, 1] * 4}).to_parquet(str(path))

    src = tmp_path / "t.parquet"
    write(src, x)
    x1, _, _ = _read(src, tmp_path / "c")
    st = src.stat()
    write(tmp_path / "new.parquet", x[[1, 0, *range(2, 8)]])  # two rows exchanged
    os.replace(tmp_path / "new.parquet", src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    x2, _, t2 = _read(src, tmp_path / "c")
    assert t2.stats["decoded"] == 8 and len(cache_files(tmp_path / "c")) == 2  # a new key, decoded anew
    assert torch.equal(x2[0], x1[1]) and torch.equal(x2[1], x1[0]) and torch.equal(x2[2:], x1[2:])  # rows as now


def _damage(path: Path, how: str) -> None:
    from cl_tool.data.cache import DATA_OFFSET

    if how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 10)
        return
    offset = {"pixel": DATA_OFFSET + 100, "label": path.stat().st_size - 40, "header": 40}[how]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("how", ["pixel", "label", "header", "truncate"])
@pytest.mark.parametrize("in_ram", [True, False])
def test_a_damaged_cache_file_is_noted_decoded_again_and_replaced(folder, tmp_path, how, in_ram):
    budget = {} if in_ram else {"ram_budget": 0}  # verified as it is loaded, or streamed over once (read per batch)
    want_x, want_y, _ = _read(folder, tmp_path / "none", cache="none")
    x1, _, _ = _read(folder, tmp_path / "c", **budget)
    (path,) = (tmp_path / "c").iterdir()
    _damage(path, how)
    x2, y2, t2 = _read(folder, tmp_path / "c", **budget)
    assert t2.stats["decoded"] == len(t2) and torch.equal(x2, want_x) and torch.equal(y2, want_y)
    assert t2.cache_note and t2.cache_note.count("\n") == 0
    assert f"the decoded-image cache file {path} failed its check" in t2.cache_note
    assert "it was not used and the images were decoded again" in t2.cache_note
    x3, _, t3 = _read(folder, tmp_path / "c", **budget)  # the new file replaced the damaged one
    assert t3.stats["decoded"] == 0 and t3.cache_note is None and torch.equal(x3, want_x)
    assert cache_files(tmp_path / "c") == [path.name]


def test_an_old_format_cache_file_is_ignored_silently(folder, tmp_path):
    want, _, _ = _read(folder, tmp_path / "c")
    (path,) = (tmp_path / "c").iterdir()
    data = bytearray(path.read_bytes())
    data[:8] = b"CLTDEC01"
    path.write_bytes(bytes(data))
    x, _, t = _read(folder, tmp_path / "c")
    assert t.stats["decoded"] == len(t) and t.cache_note is None and torch.equal(x, want)


def test_evaluate_notes_a_damaged_cache_and_gives_the_uncached_numbers(cli, small_mlp, tmp_path):
    import json

    from cl_tool.demo import make_dataset

    data = tmp_path / "d"
    make_dataset(60, seed=4).save_to_disk(str(data))
    base = ("evaluate", small_mlp, "--data", data, "--device", "cpu", "--json", "--cache-dir", tmp_path / "c")
    runs = {}
    for name, extra in (("first", ()), ("none", ("--cache", "none"))):
        r = cli(*base, *extra)
        assert r.code == 0 and "cache file" not in r.err, r.err
        runs[name] = json.loads(r.out)["accuracy"][0][0]
    (path,) = (tmp_path / "c").iterdir()
    _damage(path, "pixel")
    r = cli(*base)
    assert r.code == 0 and json.loads(r.out)["accuracy"][0][0] == runs["none"] == runs["first"]
    notes = [ln for ln in r.err.splitlines() if "failed its check (checksum mismatch)" in ln]
    assert len(notes) == 1 and "decoded again" in notes[0]
