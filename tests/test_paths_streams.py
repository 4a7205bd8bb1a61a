"""No internal error on a path or a stream: names too long for any file system, closed or non-text standard input.

An input path no file system can hold is exit 3, an output path exit 6, a ``--config`` or batch file exit 2 (their
class elsewhere), each one short sentence that shows a long name by its two ends; a 2 MB name in a batch line
gives a short echo and a short error, not 2 MB of stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir

REPO = Path(__file__).resolve().parent.parent
LONG = "n" * 300  # one component over NAME_MAX (255)


def _cases(d: Path, ck: Path, data: str) -> list[tuple[str, int, list]]:
    init = ["init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10"]
    return [
        ("info of a long name", 3, ["info", d / LONG]),
        ("info inside a long folder name", 3, ["info", d / LONG / "x.safetensors"]),
        ("init -o", 6, [*init, "-o", d / LONG]),
        ("init -o inside a long folder name", 6, [*init, "-o", d / LONG / "a.safetensors"]),
        ("prune -o", 6, ["prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", d / LONG]),
        ("evaluate --csv", 6, ["evaluate", ck, "--data", data, "--device", "cpu", "--csv", d / LONG]),
        ("evaluate --cache-dir", 6, ["evaluate", ck, "--data", data, "--device", "cpu", "--cache-dir", d / LONG]),
        ("evaluate --data", 3, ["evaluate", ck, "--data", d / LONG, "--device", "cpu"]),
        ("train-next --importance", 3, ["train-next", ck, "--data", data, "--importance", d / LONG, "-o", d / "b.st"]),
        ("convert FOLDER", 3, ["convert", d / LONG, "-o", d / "c.safetensors"]),
        ("demo-data FOLDER", 6, ["demo-data", d / LONG]),
        ("--config", 2, [*init, "-o", d / "a.safetensors", "--config", d / LONG]),
        ("batch FILE", 2, ["batch", d / LONG]),
        ("a path over PATH_MAX", 6, [*init, "-o", d / "/".join(["p" * 200] * 25)]),
    ]


@pytest.mark.parametrize("index", range(14))
def test_a_path_no_file_system_holds_is_one_sentence(cli, ws, demo_dir, index):
    d, ck = ws
    name, code, argv = _cases(d, ck, f"{demo_dir}::limit=8")[index]
    before = snapshot_dir(d)
    r = cli(*argv)
    assert r.code == code, f"{name}: {r.err}"
    assert "Traceback" not in r.err and "Internal error" not in r.err
    assert r.err.count("Error:") == 1 and len(r.error_line) < 500, f"{name}: {r.err}"
    assert "…" in r.error_line  # the long name shown by its two ends
    assert snapshot_dir(d) == before


def test_a_2mb_batch_line_is_refused_quickly_and_briefly(cli, tmp_path):
    seq = tmp_path / "seq.txt"
    seq.write_text(f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path / ('x' * 2_000_000)}\n")
    r = cli("batch", seq)
    assert r.code == 2, r.err[:500]
    assert "line 1 is 2,0" in r.error_line and "more than the 32,768" in r.error_line
    assert len(r.err) < 1_000 and "Traceback" not in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.txt"]


def test_a_long_name_in_a_batch_line_gives_a_short_echo_and_error(cli, tmp_path):
    seq = tmp_path / "seq.txt"
    seq.write_text(f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path / ('x' * 5_000)}\n")
    r = cli("batch", seq)
    assert r.code == 6, r.err[:500]
    assert len(r.err) < 1_000 and "Traceback" not in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.txt"]


@pytest.mark.parametrize(
    "shell, phrase",
    [
        ("batch - <&-", "standard input is closed"),
        ("batch - < /dev/null", "holds no command line"),
        ("printf '\\377\\376init\\n' | {cl} batch -", "not UTF-8 text"),
    ],
)
def test_batch_from_a_closed_or_odd_standard_input(shell, phrase):
    cl = f"{sys.executable} -m cl_tool"
    cmd = shell.format(cl=cl) if "{cl}" in shell else f"{cl} {shell}"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert phrase in proc.stderr and "Traceback" not in proc.stderr and "Internal error" not in proc.stderr
