"""Every exit code of the README's "Exit codes" table is real: the table matches ``cl_tool.errors`` and each code
is produced by at least one concrete, quick command line here (1 by an injected bug, 130/143 by a signal
delivered in the middle of a training step)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cl_tool.errors import EXIT_CODE_TABLE

REPO = Path(__file__).resolve().parent.parent


def readme_exit_codes() -> list[tuple[int, str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|(.*)\|\s*$", line)
        if m:
            rows.append((int(m.group(1)), m.group(2).strip().replace("`", "")))
    return rows


def test_readme_table_matches_errors_module():
    rows = readme_exit_codes()
    assert [c for c, _ in rows] == [c for c, _ in EXIT_CODE_TABLE]
    assert rows == EXIT_CODE_TABLE  # same meanings too (the README adds only code formatting)
    assert len({c for c, _ in rows}) == len(rows)


@pytest.fixture
def ws(tmp_path, small_mlp):
    ck = tmp_path / "m.safetensors"
    shutil.copy(small_mlp, ck)
    return tmp_path, ck


def _data(demo_dir, n=32, extra=""):
    return f"{demo_dir}::limit={n}{extra}"


def _broken_pipe(cli, d, ck, demo, monkeypatch):
    """A fresh process whose stdout is a pipe nobody reads any more."""
    from tests.conftest import Result

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cl_tool", "evaluate", str(ck), "--data", _data(demo), "--device", "cpu", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=300,
        )
    finally:
        os.close(write_end)
    return Result(proc.returncode, "", proc.stderr)


# code -> (description, callable(cli, d, ck, demo_dir) -> Result)
def case_0(cli, d, ck, demo):
    return cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10", "-o", d / "new.safetensors")


def case_2(cli, d, ck, demo):
    return cli("prune", ck, "--by", "magnitude", "--sparsity", "2", "-o", d / "p.safetensors")


def case_2_click(cli, d, ck, demo):
    return cli("evaluate", ck, "--no-such-option")


def case_3(cli, d, ck, demo):
    return cli("evaluate", d / "missing.safetensors", "--data", _data(demo))


def case_4(cli, d, ck, demo):
    other = d / "other.safetensors"
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "--seed", "7", "-o", other).code == 0
    assert cli("importance", other, "--method", "magnitude", "-o", d / "other.importance.safetensors").code == 0
    return cli(
        "prune",
        ck,
        "--by",
        "importance",
        "--importance",
        d / "other.importance.safetensors",
        "--sparsity",
        "0.5",
        "-o",
        d / "p.safetensors",
    )


def case_5(cli, d, ck, demo):
    assert cli("importance", ck, "--data", _data(demo, 64), "--method", "fisher", "--device", "cpu").code == 0
    return cli(
        "train-next",
        ck,
        "--data",
        _data(demo, 64, ",permute=1"),
        "--batch-size",
        "8",
        "--penalty",
        "ewc",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--lambda",
        "1e6",
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
    )


def case_6(cli, d, ck, demo):
    (d / "taken.safetensors").write_bytes(b"keep me")
    return cli("prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", d / "taken.safetensors")


def case_7(cli, d, ck, demo):
    import torch

    device = "cuda:99" if torch.cuda.is_available() else "cuda"  # no such CUDA device, or no CUDA at all
    return cli("evaluate", ck, "--data", _data(demo), "--device", device)


def case_8(cli, d, ck, demo):
    fresh = d / "fresh.safetensors"
    assert cli("init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "-o", fresh).code == 0
    return cli("evaluate", fresh, "--data", _data(demo), "--device", "cpu", "--fail-under-acc", "0.99")


def _interrupt_training(signum):
    def case(cli, d, ck, demo, monkeypatch):
        import cl_tool.training as training

        real, calls = training.lr_at, []

        def lr_at(cfg, step, total):  # called at the start of every step: deliver the signal during step 2
            calls.append(step)
            if len(calls) == 2:
                os.kill(os.getpid(), signum)
            return real(cfg, step, total)

        monkeypatch.setattr(training, "lr_at", lr_at)
        return cli(
            "train-next",
            ck,
            "--data",
            _data(demo, 64),
            "--batch-size",
            "8",
            "--penalty",
            "none",
            "--device",
            "cpu",
            "-o",
            d / "b.safetensors",
        )

    return case


def _injected_bug(cli, d, ck, demo, monkeypatch):
    import cl_tool.workflows.prune as wf

    def boom(args, out):
        raise RuntimeError("injected failure for the test")

    monkeypatch.setattr(wf, "run_prune", boom)
    return cli("prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", d / "p.safetensors")


def _keyboard_interrupt(cli, d, ck, demo, monkeypatch):
    import cl_tool.workflows.evaluate as wf

    def ctrl_c(args, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(wf, "run_evaluate", ctrl_c)
    return cli("evaluate", ck, "--data", _data(demo))


CASES = [
    (0, "init succeeds", case_0, None, False),
    (1, "a bug in a workflow", _injected_bug, "--debug", True),
    (2, "sparsity outside [0, 1)", case_2, "--sparsity must be in [0, 1)", False),
    (2, "unknown option (click)", case_2_click, "No such option", False),
    (3, "missing checkpoint", case_3, "does not exist", False),
    (4, "sidecar of another checkpoint", case_4, "belongs to another checkpoint", False),
    (5, "plain EWC with SGD at a huge lambda diverges", case_5, "Training diverged", False),
    (6, "existing output without --force", case_6, "--force", False),
    (7, "CUDA device that is not there", case_7, "--device", False),
    (8, "accuracy gate on an untrained model", case_8, "below --fail-under-acc 0.99", False),
    (141, "the reader of --json output went away", _broken_pipe, None, True),
    (130, "Ctrl-C outside training", _keyboard_interrupt, "Interrupted by Ctrl-C; nothing was written", True),
    (
        130,
        "SIGINT during a training step",
        _interrupt_training(signal.SIGINT),
        "Interrupted by SIGINT at step 2; nothing was written",
        True,
    ),
    (
        143,
        "SIGTERM during a training step",
        _interrupt_training(signal.SIGTERM),
        "Interrupted by SIGTERM at step 2; nothing was written",
        True,
    ),
]


@pytest.mark.parametrize("code,what,case,phrase,needs_monkeypatch", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_exit_code(cli, ws, demo_dir, monkeypatch, code, what, case, phrase, needs_monkeypatch):
    d, ck = ws
    r = case(cli, d, ck, demo_dir, monkeypatch) if needs_monkeypatch else case(cli, d, ck, demo_dir)
    assert r.code == code, f"{what}: exit {r.code}, expected {code}\n{r.err}"
    assert "Traceback" not in r.err, r.err
    if code in (0, 141):
        assert r.error_line == ""
    else:
        assert r.error_line.startswith("Error: ") and phrase in r.error_line, r.err
        assert len([ln for ln in r.err.splitlines() if ln.startswith("Error:")]) == 1
    if code in (5, 130, 143):
        assert not (d / "b.safetensors").exists()
    if code == 6:
        assert (d / "taken.safetensors").read_bytes() == b"keep me"


def test_every_documented_code_has_a_case():
    assert {c for c, *_ in CASES} == {c for c, _ in EXIT_CODE_TABLE}


def test_internal_error_message_suggests_debug(cli, ws, demo_dir, monkeypatch):
    d, ck = ws
    r = _injected_bug(cli, d, ck, demo_dir, monkeypatch)
    assert r.code == 1
    assert "Internal error (RuntimeError: injected failure for the test)" in r.error_line
    assert "rerun with --debug" in r.error_line and "report the traceback" in r.error_line


def test_debug_shows_the_traceback_in_process(cli, ws, monkeypatch):
    d, ck = ws
    import cl_tool.workflows.prune as wf

    monkeypatch.setattr(
        wf, "run_prune", lambda args, out: (_ for _ in ()).throw(RuntimeError("injected failure for the test"))
    )
    with pytest.raises(RuntimeError, match="injected failure"):  # --debug lets the exception through
        cli("--debug", "prune", ck, "--by", "magnitude", "--sparsity", "0.5", "-o", d / "p.safetensors")


_BUGGY_MAIN = textwrap.dedent("""
    import sys
    import cl_tool.workflows.prune as wf

    def boom(args, out):
        raise RuntimeError("injected failure for the test")

    wf.run_prune = boom
    from cl_tool.cli import main
    main(sys.argv[1:])
""")


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_internal_error_in_a_fresh_process(ws, debug):
    """Through a real interpreter: exit 1 either way; a traceback only with --debug (given after the command, too)."""
    d, ck = ws
    argv = ["prune", str(ck), "--by", "magnitude", "--sparsity", "0.5", "-o", str(d / "p.safetensors")] + (
        ["--debug"] if debug else []
    )
    proc = subprocess.run(
        [sys.executable, "-c", _BUGGY_MAIN, *argv], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    if debug:
        assert (
            "Traceback (most recent call last)" in proc.stderr
            and "RuntimeError: injected failure for the test" in proc.stderr
        )
    else:
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: Internal error") and "--debug" in proc.stderr
    assert not (d / "p.safetensors").exists()
