"""Outputs that are links or special files, and the batch file as an input of its lines.

The rule (README, "Files"): an output that is a symbolic link is refused (exit 6), whatever it points to, so
nothing is written through a link and the link itself is never replaced; a special file (FIFO, device, socket,
anything under /proc or /sys) is refused (exit 6) and never opened; a hard link's name is replaced by the atomic
rename while its other names keep their bytes. Every link and FIFO here is made in tmp_path; nothing touches the
machine's /dev.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import file_digest, snapshot_dir

INIT = ["init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10"]


def _refused(r, *phrases: str) -> None:
    assert r.code == 6, r.err
    assert "Traceback" not in r.err
    assert all(p in r.error_line for p in phrases), r.error_line


def test_symbolic_link_output_is_refused_and_neither_link_nor_target_changes(cli, tmp_path):
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"unrelated bytes")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    before = snapshot_dir(tmp_path)
    r = cli(*INIT, "-o", link, "--force")
    _refused(r, "is a symbolic link", "does not write through links")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert snapshot_dir(tmp_path) == before


@pytest.mark.parametrize("without_force", [False, True])
def test_dangling_symbolic_link_output_is_refused(cli, tmp_path, without_force):
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "elsewhere" / "new.safetensors")
    r = cli(*INIT, "-o", link, *([] if without_force else ["--force"]))
    _refused(r, "is a symbolic link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"] and link.is_symlink()


def test_link_in_a_parent_folder_is_followed(cli, tmp_path):
    """Only the last component matters: a linked folder is where the file is written (as the OS resolves it)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    r = cli(*INIT, "-o", tmp_path / "via" / "a.safetensors")
    assert r.code == 0, r.err
    assert (real / "a.safetensors").is_file() and not (real / "a.safetensors").is_symlink()


def test_hard_link_output_replaces_the_name_only(cli, tmp_path):
    other = tmp_path / "other.bin"
    other.write_bytes(b"keep me")
    out = tmp_path / "out.safetensors"
    os.link(other, out)
    r = cli(*INIT, "-o", out, "--force")
    assert r.code == 0, r.err
    assert other.read_bytes() == b"keep me"
    assert out.stat().st_nlink == 1 and out.stat().st_ino != other.stat().st_ino
    assert out.read_bytes()[:8] != b"keep me"[:8]


def test_fifo_outputs_are_refused_without_being_opened(cli, tmp_path, small_mlp, demo_dir):
    """init -o, prune -o / --mask-out, evaluate --csv, train-next --log-json: a FIFO is never opened (no hang)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "to_fifo"
    link.symlink_to(fifo)
    data = f"{demo_dir}::limit=8"
    cases = [
        [*INIT, "-o", fifo, "--force"],
        [*INIT, "-o", link, "--force"],
        ["prune", small_mlp, "--by", "magnitude", "--sparsity", "0.5", "-o", fifo, "--force"],
        ["prune", small_mlp, "--by", "magnitude", "--sparsity", "0.5", "--mask-out", fifo],
        ["evaluate", small_mlp, "--data", data, "--device", "cpu", "--csv", fifo, "--force"],
        ["train-next", small_mlp, "--data", data, "--device", "cpu", "--log-json", fifo, "-o", tmp_path / "b.st"],
    ]
    for argv in cases:
        r = cli(*argv)
        _refused(r, "is not a regular file but a FIFO")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "to_fifo"]


def test_proc_fd_and_device_outputs_are_refused(cli, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    with open(victim, "rb") as fh:
        r = cli(*INIT, "-o", f"/proc/self/fd/{fh.fileno()}", "--force")
    _refused(r, "/proc or /sys")
    assert victim.read_text() == "untouched"
    dev = tmp_path / "null_link"
    dev.symlink_to(os.devnull)
    r = cli(*INIT, "-o", dev, "--force")
    _refused(r, "is not a regular file but a device")


def test_library_writes_refuse_a_link_that_appeared_after_the_check(tmp_path):
    """atomic_path checks again at the rename, so a link made while a command ran is not replaced either."""
    from cl_tool.atomic import write_bytes_atomic
    from cl_tool.errors import OutputError

    target = tmp_path / "t"
    target.write_bytes(b"target")
    link = tmp_path / "l"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        write_bytes_atomic(link, b"new", force=True)
    assert link.is_symlink() and target.read_bytes() == b"target"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l", "t"]


def test_demo_data_output_folder_that_is_a_link_is_refused(cli, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("x")
    (tmp_path / "out").symlink_to(real)
    r = cli("demo-data", tmp_path / "out", "--force")
    _refused(r, "symbolic link")
    assert [p.name for p in real.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------------ the batch file


@pytest.mark.parametrize("how", ["same path", "hard link", "csv of evaluate"])
def test_a_batch_line_never_overwrites_its_batch_file(cli, tmp_path, small_mlp, demo_dir, how):
    seq = tmp_path / "seq.txt"
    if how == "same path":
        line = f"init --arch mlp --arch-arg sizes=784,8,10 -o {seq} --force\n"
    elif how == "hard link":
        line = f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path / 'twin.txt'} --force\n"
    else:
        line = f"evaluate {small_mlp} --data {demo_dir}::limit=8 --device cpu --csv {seq} --force\n"
    seq.write_text(line)
    if how == "hard link":
        os.link(seq, tmp_path / "twin.txt")
    before = snapshot_dir(tmp_path)
    r = cli("batch", seq)
    _refused(r, "the batch file")
    assert snapshot_dir(tmp_path) == before


def test_batch_from_redirected_stdin_protects_the_file(tmp_path):
    """`cl-tool batch - < seq.txt`: standard input is a regular file, an input of every line."""
    seq = tmp_path / "seq.txt"
    seq.write_text(f"init --arch mlp --arch-arg sizes=784,8,10 -o {seq} --force\n")
    digest = file_digest(seq)
    with open(seq, "rb") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "cl_tool", "batch", "-"],
            stdin=fh,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=120,
        )
    assert proc.returncode == 6, proc.stderr
    assert "the batch file (standard input)" in proc.stderr and "Traceback" not in proc.stderr
    assert file_digest(seq) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.txt"]
