"""Shared fixtures: an in-process CLI runner and small datasets/checkpoints made inside the tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The decoded-image cache of every command run by the tests goes to a folder of this test session, not ~/.cache.
os.environ.setdefault("CL_TOOL_CACHE", tempfile.mkdtemp(prefix="cl-tool-test-cache-"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith("Error:")]
        return lines[-1] if lines else ""


@pytest.fixture
def cli(capsys):
    """Run ``cl-tool ARGS`` in this process (the same entry point as the console script)."""
    from cl_tool.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, cwd=None, env=None, timeout=300) -> Result:
    """Run ``python -m cl_tool ARGS`` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "cl_tool", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small MNIST-like DatasetDict on disk (train 1200, test 400)."""
    import datasets

    from cl_tool.demo import make_dataset

    datasets.disable_progress_bars()
    path = tmp_path_factory.mktemp("data") / "demo"
    datasets.DatasetDict({"train": make_dataset(1200, seed=0), "test": make_dataset(400, seed=1)}).save_to_disk(
        str(path)
    )
    return path


@pytest.fixture(scope="session")
def small_mlp(tmp_path_factory, demo_dir) -> Path:
    """An MLP 784-64-10 trained briefly on the demo data (no penalty)."""
    from cl_tool.cli import main

    folder = tmp_path_factory.mktemp("ckpt")
    a0, a = folder / "a0.safetensors", folder / "a.safetensors"
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "-o", a0],
        ["train-next", a0, "--data", demo_dir, "--epochs", "1", "--device", "cpu", "-o", a],
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(x) for x in argv])
        assert exc.value.code == 0
    return a


@pytest.fixture
def ws(tmp_path, small_mlp):
    """(folder, checkpoint): a workspace folder holding a copy of the small trained MLP."""
    import shutil

    d = tmp_path / "ws"
    d.mkdir()
    ck = d / "m.safetensors"
    shutil.copy(small_mlp, ck)
    return d, ck


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot_dir(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file in ``folder`` (to assert nothing appeared or changed)."""
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count is ``n`` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread avoids OpenMP start-up/sync cost dominating on a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def anchored(tmp_path_factory, demo_dir):
    """A trained MLP with a Fisher sidecar beside it."""
    from cl_tool.cli import main

    d = tmp_path_factory.mktemp("anch")
    a0, a = d / "a0.safetensors", d / "a.safetensors"
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "-o", a0],
        ["train-next", a0, "--data", demo_dir, "--epochs", "1", "--device", "cpu", "-o", a],
        ["importance", a, "--data", demo_dir, "--method", "fisher", "--device", "cpu", "--samples", "600"],
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(x) for x in argv])
        assert exc.value.code == 0
    return a
