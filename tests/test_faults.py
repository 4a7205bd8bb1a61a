"""Faults: hostile pickles, a writer killed mid-write, a full disk, SIGTERM during training.

(a) cl-tool never unpickles: a crafted ``.pt``/``.bin`` whose unpickling would create a marker file is
    refused by every reading command (checkpoint, --importance, --accumulate, --mask, --state-file, a timm
    folder with only pytorch_model.bin) and the marker never appears.
(b) A writer killed with SIGKILL while writing leaves the destination absent (or byte-identical if it
    existed); only a ``.cl-tool-tmp-*`` leftover may remain.
(c) A full disk (ENOSPC, as the safetensors writer, plain file writes and datasets report it) ends with
    exit 6, one sentence about space, and no partial file.
(d) SIGTERM during train-next without --checkpoint-every exits 143 and writes nothing.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir

REPO = Path(__file__).resolve().parent.parent
TMP_PREFIX = ".cl-tool-tmp-"


# ------------------------------------------------------------------------------------------------------------------
# (a) crafted pickles are never loaded


class _Evil:
    """Unpickling this runs ``touch MARKER`` (the classic pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def evil(tmp_path, ws):
    """A workspace with a good checkpoint and hostile pickles in both torch formats."""
    import torch

    d, ck = ws
    marker = tmp_path / "PWNED"
    (d / "evil.pt").write_bytes(pickle.dumps({"net.1.weight": _Evil(marker)}, protocol=2))  # plain pickle
    torch.save({"state_dict": _Evil(marker)}, d / "evil.bin")  # torch's zip format, pickle inside
    shutil.copy(d / "evil.bin", d / "evil.safetensors")  # a .pt renamed .safetensors
    timm = d / "timm_model"
    timm.mkdir()
    (timm / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    shutil.copy(d / "evil.bin", timm / "pytorch_model.bin")
    timm2 = d / "timm_renamed"
    timm2.mkdir()
    (timm2 / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    shutil.copy(d / "evil.bin", timm2 / "model.safetensors")
    return d, ck, marker


def test_the_crafted_pickles_are_live(evil):
    """Sanity check of the payload: unpickling it outside cl-tool does create the marker."""
    import torch

    d, _, marker = evil
    pickle.loads((d / "evil.pt").read_bytes())
    assert marker.exists(), "unpickling evil.pt should have run the payload"
    marker.unlink()
    torch.load(d / "evil.bin", weights_only=False)
    assert marker.exists(), "torch.load(evil.bin, weights_only=False) should have run the payload"
    marker.unlink()


def _reading_commands(d: Path, ck: Path, demo: Path):
    data = f"{demo}::limit=8"
    out = d / "out.safetensors"
    evil_pt, evil_bin, evil_st = d / "evil.pt", d / "evil.bin", d / "evil.safetensors"
    cases = []
    for bad in (evil_pt, evil_bin, evil_st, d / "timm_model", d / "timm_renamed"):
        phrase = "pytorch_model.bin" if bad.name == "timm_model" else "not a safetensors file"
        cases += [
            (
                f"train-next checkpoint {bad.name}",
                ["train-next", bad, "--data", data, "--device", "cpu", "-o", out],
                phrase,
            ),
            (
                f"importance checkpoint {bad.name}",
                ["importance", bad, "--method", "magnitude", "-o", d / "i.safetensors"],
                phrase,
            ),
            (f"evaluate checkpoint {bad.name}", ["evaluate", bad, "--data", data, "--device", "cpu"], phrase),
            (
                f"prune checkpoint {bad.name}",
                ["prune", bad, "--by", "magnitude", "--sparsity", "0.5", "-o", out],
                phrase,
            ),
        ]
    for bad in (evil_pt, evil_bin):
        cases += [
            (
                f"train-next --importance {bad.name}",
                ["train-next", ck, "--data", data, "--device", "cpu", "--importance", bad, "-o", out],
                "not a safetensors file",
            ),
            (
                f"prune --importance {bad.name}",
                ["prune", ck, "--by", "importance", "--importance", bad, "--sparsity", "0.5", "-o", out],
                "not a safetensors file",
            ),
            (
                f"importance --accumulate {bad.name}",
                ["importance", ck, "--method", "magnitude", "--accumulate", bad, "-o", d / "i.safetensors"],
                "not a safetensors file",
            ),
            (
                f"train-next --mask {bad.name}",
                ["train-next", ck, "--data", data, "--device", "cpu", "--penalty", "none", "--mask", bad, "-o", out],
                "not a safetensors file",
            ),
            (
                f"train-next --resume --state-file {bad.name}",
                [
                    "train-next",
                    ck,
                    "--data",
                    data,
                    "--device",
                    "cpu",
                    "--penalty",
                    "none",
                    "--resume",
                    "--checkpoint-every",
                    "5",
                    "--state-file",
                    bad,
                    "-o",
                    out,
                ],
                "not a safetensors file",
            ),
        ]
    return cases


def test_crafted_pickles_are_never_unpickled(cli, evil, demo_dir):
    d, ck, marker = evil
    cases = _reading_commands(d, ck, demo_dir)
    assert len(cases) == 30
    before = snapshot_dir(d)
    for name, argv, phrase in cases:
        r = cli(*argv)
        assert r.code == 3, f"{name}: exit {r.code}\n{r.err}"
        assert phrase in r.error_line, f"{name}: {r.error_line}"
        assert "Traceback" not in r.err
        assert not marker.exists(), f"{name}: the pickle payload ran"
    assert snapshot_dir(d) == before


# ------------------------------------------------------------------------------------------------------------------
# (b) SIGKILL while writing


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from cl_tool.atomic import atomic_path

    dest, force = sys.argv[1], sys.argv[2] == "1"
    data = bytes(range(256)) * 4096  # 1 MiB, written slowly in 4 KiB chunks
    with atomic_path(dest, force=force) as tmp:
        with open(tmp, "wb") as fh:
            for i in range(0, len(data), 4096):
                fh.write(data[i:i + 4096])
                fh.flush()
                if i == 4096 * 8:
                    print("WRITING", flush=True)
                time.sleep(0.002)
    print("DONE", flush=True)
""")


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _reap(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.mark.parametrize("existing", [False, True], ids=["new-destination", "existing-destination"])
def test_sigkill_during_a_slow_write_leaves_no_partial_file(tmp_path, existing):
    dest = tmp_path / "ck.safetensors"
    if existing:
        dest.write_bytes(b"the previous, complete version")
    old = dest.read_bytes() if existing else None
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(dest), "1" if existing else "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", line + proc.stderr.read()
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
        assert len(tmp) == 1 and tmp[0].stat().st_size > 0  # the write is under way, into a temporary file
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _reap(proc)
    assert proc.returncode == -signal.SIGKILL
    if existing:
        assert dest.read_bytes() == old
    else:
        assert not dest.exists()
    left = _leftovers(tmp_path, {dest.name})
    assert left and all(n.startswith(f"{TMP_PREFIX}{proc.pid}@") and dest.name in n for n in left), left
    # The next successful write into the folder removes what the killed writer left, and only that.
    from cl_tool.atomic import tmp_prefix, write_text_atomic

    live = tmp_path / (tmp_prefix("other.safetensors") + "x")  # a temporary file of a live writer (this process)
    live.write_bytes(b"in progress")
    write_text_atomic(tmp_path / "next.txt", "ok")
    assert _leftovers(tmp_path, {dest.name, "next.txt"}) == [live.name]


_BIG_WRITER = textwrap.dedent("""
    import sys
    import torch
    from cl_tool.safetensors_io import save_tensors

    print("START", flush=True)
    save_tensors(sys.argv[1], {"w": torch.ones(50_000_000)}, {"cl_tool.format": "1"}, force=False)  # 200 MB
    print("DONE", flush=True)
""")


def test_sigkill_during_a_real_200mb_write(tmp_path):
    """The real safetensors writer, killed as soon as its temporary file has data: the destination never exists half-written."""
    dest = tmp_path / "big.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BIG_WRITER, str(dest)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    killed_mid_write = False
    try:
        assert proc.stdout.readline().strip() == b"START"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tmp = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
            try:
                if tmp and tmp[0].stat().st_size > 0 and not dest.exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_mid_write = True
                    break
            except FileNotFoundError:  # renamed between listing and stat
                pass
            time.sleep(0.001)
        proc.wait(timeout=60)
    finally:
        _reap(proc)
    try:
        if killed_mid_write and proc.returncode == -signal.SIGKILL:
            assert not dest.exists(), "a killed writer left a destination file"
        else:  # the write finished before the kill landed: the file must then be complete
            from cl_tool.safetensors_io import read_header

            header, _ = read_header(dest)
            assert header["w"]["shape"] == [50_000_000]
        left = _leftovers(tmp_path, {dest.name})
        assert all(n.startswith(TMP_PREFIX) for n in left), left
    finally:
        for p in tmp_path.iterdir():  # free 200 MB now
            p.unlink()


# ------------------------------------------------------------------------------------------------------------------
# (c) disk full


def _full_disk_writer(tensors, filename, metadata=None):
    """A stand-in for the safetensors writer that writes part of the file, then fails like a full disk."""
    with open(filename, "wb") as fh:
        fh.write(b"\0" * 1000)  # a partial file that must not survive
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_cases(d: Path, ck: Path, demo: Path):
    data = f"{demo}::limit=8"
    return {
        "init": ["init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10", "-o", d / "i.safetensors"],
        "train-next": ["train-next", ck, "--data", data, "--device", "cpu", "-o", d / "t.safetensors"],
        "train-next-si-out": [
            "train-next",
            ck,
            "--data",
            data,
            "--device",
            "cpu",
            "--si-out",
            d / "si.safetensors",
            "-o",
            d / "t.safetensors",
        ],
        "importance": ["importance", ck, "--method", "magnitude", "-o", d / "w.importance.safetensors"],
        "prune": ["prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", d / "p.safetensors"],
        "prune-mask-out": [
            "prune",
            ck,
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "--mask-out",
            d / "p.mask.safetensors",
        ],
    }


@pytest.mark.parametrize(
    "command", ["init", "train-next", "train-next-si-out", "importance", "prune", "prune-mask-out"]
)
def test_disk_full_while_writing_a_safetensors_output(cli, ws, demo_dir, monkeypatch, command):
    from cl_tool import safetensors_io

    d, ck = ws
    argv = _full_disk_cases(d, ck, demo_dir)[command]
    if command == "train-next-si-out":  # the checkpoint fits, the SI sidecar does not
        real = safetensors_io.write_safetensors_file
        calls = []

        def second_fails(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 1:
                return real(tensors, filename, metadata)
            return _full_disk_writer(tensors, filename, metadata)

        monkeypatch.setattr(safetensors_io, "write_safetensors_file", second_fails)
    elif command.startswith(
        "prune"
    ):  # prune streams tensors into the file with os.pwrite / write (cl_tool.prune_stream)

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        real_pwrite = os.pwrite
        monkeypatch.setattr(
            os, "pwrite", lambda fd, data, offset: real_pwrite(fd, bytes(data)[:100], offset) and full_disk()
        )
    else:
        monkeypatch.setattr(safetensors_io, "write_safetensors_file", _full_disk_writer)
    before = snapshot_dir(d)
    r = cli(*argv)
    assert r.code == 6, r.err
    assert "No space left on the device" in r.error_line and "nothing was written" in r.error_line, r.error_line
    assert "Traceback" not in r.err
    after = snapshot_dir(d)
    new = set(after) - set(before)
    assert not new, new  # train-next-si-out: the checkpoint was complete when the sidecar failed, and is removed again
    assert all(after[k] == v for k, v in before.items())
    assert not [p for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_disk_full_while_writing_evaluate_csv(cli, ws, demo_dir, monkeypatch):
    d, ck = ws

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    before = snapshot_dir(d)
    r = cli("evaluate", ck, "--data", f"{demo_dir}::limit=8", "--device", "cpu", "--csv", d / "r.csv")
    assert r.code == 6 and "No space left" in r.error_line and "Traceback" not in r.err, r.err
    assert snapshot_dir(d) == before
    assert not [p for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_disk_full_while_writing_demo_data(cli, tmp_path, monkeypatch):
    import datasets

    def save_to_disk(self, path, *a, **k):
        Path(path).mkdir(parents=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", save_to_disk)
    r = cli("demo-data", tmp_path / "demo", "--train", "4", "--test", "2")
    assert r.code == 6 and "No space left" in r.error_line and "Traceback" not in r.err, r.err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary folder is left


def _mount_tiny_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


def test_real_full_disk_on_a_tiny_tmpfs(cli, tmp_path, small_mlp):
    """Where the tests may mount a 128 KiB tmpfs (root in a container), check a genuinely full disk end to end."""
    tiny = tmp_path / "tiny"
    if not _mount_tiny_tmpfs(tiny):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the monkeypatched tests cover this")
    try:
        r = cli("init", "--arch", "mlp", "-o", tiny / "a.safetensors")  # 784-300-150-10: 1.1 MB > 128 KiB
        assert r.code == 6 and "No space left" in r.error_line and "Traceback" not in r.err, r.err
        r = cli("prune", small_mlp, "--by", "magnitude", "--sparsity", "0.5", "-o", tiny / "p.safetensors")
        assert r.code == 6 and "No space left" in r.error_line, r.err
        r = cli("demo-data", tiny / "demo", "--train", "2000", "--test", "10")
        assert r.code == 6 and "No space left" in r.error_line, r.err
        assert list(tiny.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(tiny)], capture_output=True)


# ------------------------------------------------------------------------------------------------------------------
# (d) SIGTERM during train-next without --checkpoint-every


def test_sigterm_during_train_next_without_checkpointing(tmp_path, small_mlp, demo_dir):
    d = tmp_path / "ws"
    d.mkdir()
    ck = d / "m.safetensors"
    shutil.copy(small_mlp, ck)
    out = d / "b.safetensors"
    before = snapshot_dir(d)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cl_tool",
            "train-next",
            str(ck),
            "--data",
            f"{demo_dir}::limit=64",
            "--batch-size",
            "8",
            "--epochs",
            "100000",
            "--penalty",
            "none",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    err_lines: list[str] = []
    rest = ""
    try:
        deadline = time.time() + 120
        for line in proc.stderr:  # wait until training is under way (one epoch logged)
            err_lines.append(line)
            if line.startswith("epoch 1:") or time.time() > deadline:
                break
        assert any(ln.startswith("epoch 1:") for ln in err_lines), "".join(err_lines)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(err_lines) + (rest or "")
    assert proc.returncode == 143, err
    error_line = [ln for ln in err.splitlines() if ln.startswith("Error:")][-1]
    assert (
        "Interrupted by SIGTERM" in error_line
        and "nothing was written" in error_line
        and "--checkpoint-every" in error_line
    )
    assert "Traceback" not in err
    assert snapshot_dir(d) == before  # no output, no resume state, no temporary file


# ------------------------------------------------------------------------------------------------------------------
# atomic outputs get ordinary permissions


def test_outputs_follow_the_umask_not_mkstemp_0600(cli, tmp_path):
    out = tmp_path / "a.safetensors"
    old = os.umask(0o022)
    try:
        r = cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10", "-o", out)
    finally:
        os.umask(old)
    assert r.code == 0, r.err
    assert out.stat().st_mode & 0o777 == 0o644
