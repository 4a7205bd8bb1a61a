"""Worker processes: a dead worker is a one-sentence error (no hang), signals go to the main process, close() leaves none behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cl_tool.data import Preprocess, TaskSpec, as_worker_error, default_workers, open_task
from cl_tool.errors import EnvironmentProblem
from tests._data_util import imagefolder

PRE = Preprocess.builtin((3, 16, 16), (0.5,) * 3, (0.2,) * 3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return imagefolder(tmp_path_factory.mktemp("w") / "data", per_class=8)


def _workers_of(task):
    it = getattr(task._pool.loader, "_iterator", None)
    return list(getattr(it, "_workers", []))


def test_a_killed_worker_is_a_clear_error_not_a_hang(folder):
    task = open_task(TaskSpec(str(folder)), PRE, cache="none", workers=2)
    t0 = time.time()
    with pytest.raises(EnvironmentProblem) as err:
        for i, _ in enumerate(task.batches(batch_size=2)):
            if i == 1:
                os.kill(_workers_of(task)[0].pid, signal.SIGKILL)
                time.sleep(0.5)  # torch's SIGCHLD handler, or the next batch, notices
        for _ in task.batches(batch_size=2):
            pass
    assert time.time() - t0 < 60
    msg = str(err.value)
    assert err.value.exit_code == 7 and "data-loading process died" in msg and "workers" in msg and "\n" not in msg
    task.close()
    try:
        assert list(task.batches(batch_size=6))  # a new pass starts new workers
    finally:
        task.close()


def test_as_worker_error_maps_torch_messages():
    e = as_worker_error(RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. "))
    assert isinstance(e, EnvironmentProblem) and "worker (pid 123) was killed by signal Killed" in e.message
    assert as_worker_error(RuntimeError("something else")) is None


def test_workers_ignore_sigint_and_close_stops_them(folder):
    task = open_task(TaskSpec(str(folder)), PRE, cache="none", workers=2)
    batches = task.batches(batch_size=2)
    next(batches)
    workers = _workers_of(task)
    assert len(workers) == 2
    for w in workers:  # right away: a worker may still be starting (forked with the signals blocked, so it survives)
        os.kill(w.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    time.sleep(0.3)
    assert all(w.is_alive() for w in workers)
    assert sum(1 for _ in batches) == 11  # the pass goes on (24 images, 12 batches)
    task.close()
    time.sleep(0.2)
    assert not any(w.is_alive() for w in workers) and not [p for p in multiprocessing.active_children() if p in workers]


def _start(script: str, folder) -> subprocess.Popen:
    """``script`` in a fresh interpreter, in its own process group (so the test can signal or probe all of it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(folder)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from cl_tool.data import Preprocess, TaskSpec, open_task
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))  # what train-next does: a flag checked between steps
    t = open_task(TaskSpec(sys.argv[1]), Preprocess.builtin((3, 16, 16), (0.5,) * 3, (0.2,) * 3), cache="none", workers=2)
    n = 0
    for epoch in range(1000):
        for b in t.batches(batch_size=2, shuffle=True, epoch=epoch):
            n += 1
            if n == 3:
                print("running", flush=True)
            time.sleep(0.05)
            if stop:
                break
        if stop:
            break
    print("stopped after", n, flush=True)
    sys.exit(143)  # the task's workers are closed at exit, even without close()
""")


def test_sigterm_to_the_process_group_stops_cleanly(folder):
    p = _start(SCRIPT, folder)
    assert p.stdout.readline().strip() == "running"
    os.killpg(p.pid, signal.SIGTERM)  # like a batch scheduler: every process of the job gets it
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143 and out.startswith("stopped after"), err
    assert "Traceback" not in err and "killed by signal" not in err
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)  # no worker left behind


def test_default_workers(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    n = default_workers()
    cpus = len(os.sched_getaffinity(0))
    assert n == (0 if cpus <= 1 else min(8, cpus))
    # one process: a worker per CPU, at most 8; none (decode in the process) on one CPU
    assert [default_workers(c, 1) for c in (1, 2, 3, 5, 9, 64)] == [0, 2, 3, 5, 8, 8]
    # L processes on the host (torchrun): ⌊C / L⌋ each, at most 8, 0 when that is under 2
    assert [default_workers(16, 2), default_workers(16, 8), default_workers(96, 8), default_workers(4, 8)] == [
        8,
        2,
        8,
        0,
    ]
    assert default_workers(2, 2) == 0 and default_workers(3, 2) == 0 and default_workers(4, 2) == 2
    assert default_workers(15, 8) == 0 and default_workers(24, 8) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers(cpus=20) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert default_workers(cpus=20) == 8


DROPPED = textwrap.dedent("""
    import sys
    from cl_tool.data import Preprocess, TaskSpec, open_task
    task = open_task(TaskSpec(sys.argv[1]), Preprocess.builtin((3, 16, 16), (0.5,) * 3, (0.2,) * 3), cache="none", workers=2)
    batches = iter(task.batches(batch_size=2))
    next(batches)  # persistent workers are running
    cycle = [task, batches]
    cycle.append(cycle)  # a reference cycle: nothing closes the task before the interpreter exits
    del task, batches, cycle
    print("done", flush=True)
""")


def test_a_process_that_never_closes_its_task_still_exits(folder):
    """Workers ignore SIGTERM (multiprocessing's exit handler would wait for them forever); the exit hook stops them."""
    p = _start(DROPPED, folder)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0 and out.strip() == "done", err
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)  # no worker left behind
