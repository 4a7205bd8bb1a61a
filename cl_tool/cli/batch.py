"""``cl-tool batch``: run cl-tool command lines one after another in one process, so start-up is paid once.

A continual-learning sequence is several commands (train-next, importance, train-next, ..., evaluate); as
separate processes each one imports torch again (3 s on a small CPU). ``batch`` reads the lines first (a
malformed line stops it before anything runs), then runs each through the same entry point as the console
script, stopping at the first line that fails (its exit code is the batch's) unless ``--keep-going``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from cl_tool.errors import EXIT_SIGINT, UsageError

HELP = (
    "Run cl-tool command lines from FILE (or - for standard input) one after another in this process: "
    "torch and the rest are imported once."
)

EPILOG = """Examples:

  cl-tool batch sequence.txt

  printf 'train-next a.safetensors --data ./b -o b.safetensors\\nevaluate a.safetensors b.safetensors --data ./a --data ./b\\n' | cl-tool batch -

A line is a cl-tool command line without the leading `cl-tool` (it may be there), split as a POSIX shell would
split it (quotes, backslashes, `#` comments; a line ending in a backslash continues on the next one); nothing else of a shell applies: no $VARIABLES, globs, pipes or
redirections. Blank lines and comments are skipped. Each line behaves exactly as the same command on its own
(its outputs, --json on stdout, logs on stderr); the batch stops at the first line that fails and exits with
its code, naming the line (--keep-going runs the rest and exits with the first failure's code). A batch inside
a batch is refused.
"""


def read_lines(source: str) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every command line of ``source`` (a file path or ``-``); UsageError names a bad line."""
    name = "standard input" if source == "-" else source
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"batch file {source} does not exist or is not a file; give a file of command lines or -.")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"batch file {source} could not be read as UTF-8 text ({exc}); give a text file of cl-tool command lines."
            ) from exc
    lines = []
    for number, line in logical_lines(text):
        try:
            argv = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UsageError(f"{name} line {number}: {exc} (check its quotes); nothing was run.") from exc
        if argv and argv[0] == "cl-tool":
            argv = argv[1:]
        if not argv:
            continue
        if next((a for a in argv if not a.startswith("-")), None) == "batch":
            raise UsageError(f"{name} line {number} runs batch inside a batch; list its lines here instead.")
        lines.append((number, argv))
    if not lines:
        raise UsageError(f"{name} holds no command line; nothing was run.")
    return lines


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each command line: a line ending in an unescaped backslash continues on the
    next one (backslash and newline removed), as in a shell; a comment line never continues."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        start, joined = pending if pending is not None else (number, "")
        joined += line
        trailing = len(joined) - len(joined.rstrip("\\"))
        if trailing % 2 == 1 and not joined.lstrip().startswith("#"):
            pending = (start, joined[:-1])
            continue
        pending = None
        out.append((start, joined))
    if pending is not None:  # a backslash on the last line continues onto nothing
        out.append(pending)
    return out


def batch(
    file: Annotated[str, typer.Argument(metavar="FILE", help="A file of cl-tool command lines, or - for stdin.")],
    keep_going: Annotated[
        bool,
        typer.Option("--keep-going", help="Run every line even after one fails; exit with the first failure's code."),
    ] = False,
) -> int:
    from cl_tool.cli import QUIET, run_line

    lines = read_lines(file)
    quiet = QUIET[0]
    name = "standard input" if file == "-" else file
    first_failure = 0
    for i, (number, argv) in enumerate(lines):
        if not quiet:
            sys.stderr.write(f"[{i + 1}/{len(lines)}] cl-tool {shlex.join(argv)}\n")
            sys.stderr.flush()
        _reset_process_state()
        code = run_line((["--quiet"] if quiet else []) + argv, last=False)
        if code == 0:
            continue
        first_failure = first_failure or code
        rest = len(lines) - i - 1
        if code == EXIT_SIGINT or not keep_going:
            if rest:
                sys.stderr.write(
                    f"Error: {name} line {number} failed (exit {code}); the {rest} line(s) after it were not run.\n"
                )
            return code
        sys.stderr.write(f"Error: {name} line {number} failed (exit {code}); going on (--keep-going).\n")
    return first_failure


def _reset_process_state() -> None:
    """What one command may leave set for the process: put back before the next line."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.use_deterministic_algorithms(False)


RUN = batch
