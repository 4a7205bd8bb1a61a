"""`cl-tool --help` and every command's --help answer without importing torch, timm or datasets."""

import subprocess
import sys

import pytest

COMMANDS = ["init", "train-next", "importance", "evaluate", "prune", "info", "convert", "demo-data"]

PROBE = """
import sys
from cl_tool.cli import main
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "timm", "datasets") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("CODE=" + str(code))
"""


@pytest.mark.parametrize("args", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_does_not_import_heavy_packages(args):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120)
    assert "CODE=0" in proc.stdout, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout
    assert "Usage" in proc.stdout


def test_every_command_help_has_examples(cli):
    for c in COMMANDS:
        r = cli(c, "--help")
        assert r.code == 0
        assert "Examples" in r.out and "cl-tool " + c in r.out


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "cl_tool", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("cl-tool ")


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_follows_the_click_convention(cli, command):
    """Arguments in capitals on the usage line (no braces), flags without a type (no '<bool>'), no type column for arguments."""
    r = cli(*([command] if command else []), "--help")
    assert r.code == 0
    usage = next(line for line in r.out.splitlines() if "Usage:" in line)
    assert "{" not in usage and "<" not in usage, usage
    assert "<bool>" not in r.out and "<path>" not in r.out and "<str>" not in r.out, r.out
    if command in ("train-next", "importance", "prune"):
        assert usage.split()[-1] == "CHECKPOINT", usage
    if command == "evaluate":
        assert usage.split()[-1] == "CHECKPOINT...", usage


def test_a_command_line_imports_only_its_own_workflow():
    """`cl-tool prune --help` builds the prune command alone: no other command's workflow module is imported."""
    probe = PROBE.format(args=["prune", "--help"]) + (
        "print('WORKFLOWS=' + ','.join(sorted(m for m in sys.modules if m.startswith('cl_tool.workflows.'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "CODE=0" in proc.stdout, proc.stderr
    assert "WORKFLOWS=cl_tool.workflows.prune\n" in proc.stdout, proc.stdout


def test_root_help_and_an_unknown_command_still_see_every_command(cli):
    r = cli("--help")
    assert r.code == 0
    for c in [*COMMANDS, "batch", "cache"]:
        assert c in r.out
    r = cli("prunee", "x.safetensors")
    assert r.code == 2 and "prune" in r.err
