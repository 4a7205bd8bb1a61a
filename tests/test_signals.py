"""Every command is interruptible: SIGTERM exits 143, SIGINT 130, and the command's temporary files are removed.

Each case starts a real ``cl-tool`` process whose decoded-cache writer pauses after its first rows (a wrapper
replaces ``Store.put`` by the original followed by a sleep that only a signal ends, and drops a marker file), so the signal
arrives at a known point: mid first pass, the cache's ``.cl-tool-tmp-…cltd`` file open, workers (where asked)
running. The oracle: the exit code, one ``Error:`` line naming the signal, no traceback, no temporary or new file in
the workspace or the cache folder, inputs byte-identical, and no process left behind.
"""

from __future__ import annotations

import os
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

PAUSE_AFTER_FIRST_ROWS = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    import cl_tool.data.cache as cache
    import cl_tool.training as training

    marker = Path(os.environ["CL_TEST_PAUSED"])
    put, handle = cache.Store.put, training._SignalFlag._handle
    flagged = []

    def paused_put(self, idx, x):
        put(self, idx, x)
        marker.write_text("paused")
        while not flagged:  # the signal's exception leaves from here; the training loop's flag ends the pause
            time.sleep(0.05)

    def flag_and_note(self, signum, frame):
        flagged.append(signum)
        handle(self, signum, frame)

    cache.Store.put = paused_put
    training._SignalFlag._handle = flag_and_note
    from cl_tool.cli import main

    main(sys.argv[1:])
    """
)


def _commands(ck: Path, data: str, d: Path) -> dict[str, list[str]]:
    seq = d / "seq.txt"  # a batch: the interrupted line stops it; the line after it never runs
    seq.write_text(
        f"evaluate {ck} --data {data} --device cpu --batch-size 8 --workers 0 --cache-dir {d.parent / 'cache'}\n"
        f"init --arch mlp --arch-arg sizes=784,8,10 -o {d / 'never.safetensors'}\n"
    )
    return {
        "batch": ["batch", str(seq)],
        "evaluate": ["evaluate", str(ck), "--data", data, "--device", "cpu", "--csv", str(d / "r.csv")],
        "importance": ["importance", str(ck), "--data", data, "--method", "fisher", "--device", "cpu"],
        "prune --sweep": [
            "prune",
            str(ck),
            "--by",
            "magnitude",
            "--sweep",
            "0.5,0.9",
            "--data",
            data,
            "--device",
            "cpu",
        ],
        "train-next": [
            "train-next",
            str(ck),
            "--data",
            data,
            "--device",
            "cpu",
            "--penalty",
            "none",
            "--log-json",
            str(d / "log.jsonl"),
            "-o",
            str(d / "b.safetensors"),
        ],
    }


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.parametrize(
    "command, signum, workers",
    [
        ("evaluate", signal.SIGTERM, 0),
        ("importance", signal.SIGTERM, 1),  # a DataLoader worker running: stopped too
        ("prune --sweep", signal.SIGTERM, 0),
        ("train-next", signal.SIGTERM, 0),
        ("prune --sweep", signal.SIGINT, 0),
        ("batch", signal.SIGTERM, 0),  # evaluate as a batch line; the line after it never runs
    ],
)
def test_a_signal_mid_run_exits_with_its_code_and_leaves_nothing(
    tmp_path, small_mlp, demo_dir, command, signum, workers
):
    d = tmp_path / "ws"
    d.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    ck = d / "m.safetensors"
    shutil.copy(small_mlp, ck)
    marker = tmp_path / "paused"
    argv = _commands(ck, f"{demo_dir}::limit=64", d)[command]
    if command != "batch":
        argv += ["--batch-size", "8", "--workers", str(workers), "--cache-dir", str(cache)]
    before = snapshot_dir(d)
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSE_AFTER_FIRST_ROWS, *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CL_TEST_PAUSED": str(marker)},
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (
            f"never reached the pause (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}"
        )
        assert any(p.name.startswith(".cl-tool-tmp-") for p in cache.iterdir()), "the cache's temporary file is open"
        children = _children(proc.pid)
        assert len(children) >= workers
        proc.send_signal(signum)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    error_lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(error_lines) == (2 if command == "batch" else 1), err
    assert name in error_lines[0] and "nothing was written" in error_lines[0], err
    if command == "batch":
        assert "line 1 failed (exit 143); the 1 line(s) after it were not run" in error_lines[1]
    assert "Traceback" not in err
    assert snapshot_dir(d) == before  # no output, log, temporary file; the checkpoint unchanged
    assert list(cache.iterdir()) == []  # the unfinished cache file removed
    assert all(not Path(f"/proc/{c}").exists() for c in children), "a worker process outlived the command"
