"""One output object for every command: the result on stdout (for people, or as JSON), logs on stderr.

``Output(json=..., quiet=...)`` is made by the CLI from ``--json`` and ``--quiet`` and handed to the
workflows. The command's result goes to stdout: ``say`` (a line) and ``table`` for people, or, with
``json`` set, ``result`` as one JSON document instead (``say``/``table`` then print nothing). Logs,
notes and warnings go to stderr: ``log`` (dropped by ``quiet``), ``warn`` (always); ``progress``
shows a rich bar only when stderr is a terminal (it vanishes when done). ``quiet`` never hides a
result. A stderr whose reader went away drops what follows (the command goes on); a stdout whose
reader went away ends the command quietly (exit 141). No torch import here.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cl_tool.errors import ClToolError, StdoutGone


class Output:
    def __init__(self, *, json: bool = False, quiet: bool = False, name_of: Callable[[str], str | None] | None = None):
        self.json = json
        self.quiet = quiet
        self.name_of = name_of  # how ``$name`` placeholders in messages are shown (the CLI: as flags)
        self._console = None
        self._stdout = None

    def text(self, message: str) -> str:
        """``message`` with its ``$name`` placeholders rendered (see :mod:`cl_tool.errors`)."""
        return ClToolError(message).render(self.name_of) if "$" in message else message

    @property
    def console(self):
        """The stderr console (created lazily so importing this module stays cheap)."""
        if self._console is None:
            from rich.console import Console

            class StderrConsole(Console):
                def on_broken_pipe(
                    self,
                ) -> None:  # rich would exit the process; a log reader that went away must not stop a job
                    self.quiet = True

            self._console = StderrConsole(stderr=True, highlight=False)
        return self._console

    @property
    def stdout(self):
        """The stdout console for human results (created lazily)."""
        if self._stdout is None:
            from rich.console import Console

            class StdoutConsole(Console):
                def on_broken_pipe(self) -> None:  # the reader of the result went away: stop quietly (exit 141)
                    raise StdoutGone()

            self._stdout = StdoutConsole(highlight=False)
            if not self._stdout.is_terminal and "COLUMNS" not in os.environ:
                self._stdout.width = 200  # a pipe or file: whole cells for grep, not 80 columns of ellipses
        return self._stdout

    def say(self, message: str) -> None:
        """One line of the human result on stdout (nothing with --json: the JSON document is the result)."""
        if not self.json:
            self.stdout.print(self.text(message), markup=False, soft_wrap=True)

    def log(self, message: str) -> None:
        """One human-readable line on stderr (suppressed by --quiet)."""
        if not self.quiet:
            self.console.print(self.text(message), markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {self.text(message)}", style="yellow", markup=False, soft_wrap=True)

    def table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A rich table of the human result on stdout (nothing with --json: machines read the JSON document)."""
        if self.json:
            return
        from rich.table import Table

        self.stdout.print(title, markup=False, style="bold")
        table = Table()
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*[_fmt(v) for v in row])
        self.stdout.print(table)

    def progress(self, description: str, total: int | None) -> Progress:
        return Progress(self, description, total)

    def result(self, obj: Any) -> Any:
        """Print ``obj`` as one JSON document on stdout when --json was given; return it."""
        if self.json:
            print_json(obj)
        return obj


#: Whether the command now running printed its JSON document (the CLI's error path then prints none).
PRINTED = [False]


def print_json(obj: Any) -> None:
    """``obj`` as one JSON document on stdout (non-finite floats as null/"inf"/"-inf")."""
    try:
        sys.stdout.write(json.dumps(_jsonable(obj), indent=2) + "\n")
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise StdoutGone() from exc
    PRINTED[0] = True


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class Progress:
    """A rich progress bar on a terminal, nothing otherwise; use as a context manager."""

    def __init__(self, out: Output, description: str, total: int | None):
        self.out = out
        self.description = description
        self.total = total
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.out.console.is_terminal and not self.out.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.out.console,
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB`` (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n):,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
