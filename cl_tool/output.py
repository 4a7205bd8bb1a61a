"""Shared output helpers: logs and tables on stderr for people, JSON on stdout for machines.

Rich progress bars are shown only when stderr is a terminal, and vanish when done.
No torch import here.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable, Sequence

_console = None


def console():
    """The stderr console (created lazily so importing this module stays cheap)."""
    global _console
    if _console is None:
        from rich.console import Console

        class _StderrConsole(Console):
            def on_broken_pipe(self) -> None:  # rich exits the process; a log reader that went away must not stop the command
                self.quiet = True

        _console = _StderrConsole(stderr=True, highlight=False)
    return _console


_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _print(*objects, **kwargs) -> None:
    """Print on the stderr console (if stderr's reader went away, this and later output are dropped; the command goes on)."""
    console().print(*objects, **kwargs)


def log(message: str) -> None:
    """One human-readable line on stderr (suppressed by --quiet)."""
    if not _quiet:
        _print(message, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    _print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout (a reader that went away ends the command quietly, exit 141)."""
    from cl_tool.errors import StdoutGone

    try:
        sys.stdout.write(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise StdoutGone() from exc


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A rich table on stderr (people read it; machines use --json)."""
    if _quiet:
        return
    from rich.table import Table

    _print(title, markup=False, style="bold")
    table = Table()
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    _print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class Progress:
    """A rich progress bar on a terminal, nothing otherwise; use as a context manager."""

    def __init__(self, description: str, total: int | None):
        self.description = description
        self.total = total
        self._progress = None
        self._task = None

    def __enter__(self) -> "Progress":
        if console().is_terminal and not _quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._progress = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=console(), transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({"description": description} if description else {}))

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
