"""Known failures and their exit codes.

Every command raises one of these for a failure the user can fix; the CLI turns it into a
single sentence on stderr and the exit code below. Anything else is a bug: it exits 1 and
``--debug`` shows the traceback. This module must not import torch.

Messages name a command's parameters neutrally, as ``$name`` placeholders (``"$sparsity must be in
[0, 1), got 1.5."``): the CLI renders them as the flag the user typed (``--sparsity``), a library
caller sees the parameter name (``sparsity``).
"""

from __future__ import annotations

import string
from collections.abc import Callable

# Documented in README.md ("Exit codes"); tests/test_exit_codes.py checks each is produced.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INCOMPATIBLE = 4
EXIT_DIVERGED = 5
EXIT_OUTPUT = 6
EXIT_ENVIRONMENT = 7
EXIT_GATE = 8
EXIT_SIGINT = 130
EXIT_BROKEN_PIPE = 141
EXIT_SIGTERM = 143


LONG_WORD = 160  # a longer word of a message (a path, a quoted value) is shown by its two ends


def shorten(text: str, limit: int = LONG_WORD) -> str:
    """``text`` if at most ``limit`` characters, else its first and last characters around " … " (one line)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return f"{text[:head]} … {text[-(limit - head - 3) :]}"


def shorten_words(message: str, limit: int = LONG_WORD) -> str:
    """A message whose every word (run of non-spaces) longer than ``limit`` is :func:`shorten`-ed."""
    return " ".join(shorten(w, limit) for w in message.split(" "))


class _Names(dict):
    def __init__(self, name_of: Callable[[str], str | None]):
        super().__init__()
        self.name_of = name_of

    def __missing__(self, key: str) -> str:
        name = self.name_of(key)
        if name is None:
            raise KeyError(key)  # not a parameter: safe_substitute keeps "$key" as written
        return name


class ClToolError(Exception):
    """A failure with a one-sentence message that says what is wrong and what to do."""

    exit_code = EXIT_INTERNAL
    #: The command's result so far (e.g. evaluate's matrix and gate verdict), printed with the error under --json.
    result: object = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def render(self, name_of: Callable[[str], str | None] | None = None) -> str:
        """The message with each ``$name`` replaced by ``name_of(name)`` (default: the name itself)."""
        return string.Template(self.message).safe_substitute(_Names(name_of or (lambda key: key)))

    def __str__(self) -> str:
        return self.render()


class UsageError(ClToolError):
    """An option value or a combination of options is invalid."""

    exit_code = EXIT_USAGE


class BadInputError(ClToolError):
    """An input file or dataset is missing, unreadable, corrupt or malformed."""

    exit_code = EXIT_BAD_INPUT


class IncompatibleError(ClToolError):
    """Inputs are each valid but do not belong together (fingerprints, classes, shapes)."""

    exit_code = EXIT_INCOMPATIBLE


class DivergedError(ClToolError):
    """Training produced a non-finite loss or gradient; nothing was written."""

    exit_code = EXIT_DIVERGED


class OutputError(ClToolError):
    """An output cannot be written (exists without --force, is an input, disk full, ...)."""

    exit_code = EXIT_OUTPUT


class EnvironmentProblem(ClToolError):
    """The machine lacks something: a device, an optional package, network access."""

    exit_code = EXIT_ENVIRONMENT


class GateFailed(ClToolError):
    """A quality gate (evaluate --fail-under-acc / --fail-over-forgetting) did not pass."""

    exit_code = EXIT_GATE


class Interrupted(ClToolError):
    """SIGINT/SIGTERM arrived; a resumable state may have been written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Terminated(BaseException):
    """SIGTERM arrived outside a training loop: raised by the CLI's handler so the command unwinds as on Ctrl-C.

    A BaseException (like KeyboardInterrupt), so no ``except Exception`` turns it into another error, while every
    ``finally`` and ``except BaseException`` clean-up (temporary files, the decoded cache's file, data workers) runs.
    """

    exit_code = EXIT_SIGTERM


class StdoutGone(ClToolError):
    """The reader of standard output went away (a closed pipe); the command stops without a message."""

    exit_code = EXIT_BROKEN_PIPE

    def __init__(self):
        super().__init__("")


EXIT_CODE_TABLE = [
    (EXIT_OK, "success"),
    (EXIT_INTERNAL, "internal error (a bug): rerun with --debug and report the traceback"),
    (EXIT_USAGE, "invalid option, option value, combination of options or config file"),
    (EXIT_BAD_INPUT, "an input file or dataset is missing, unreadable, corrupt or malformed"),
    (
        EXIT_INCOMPATIBLE,
        "inputs do not belong together (sidecar of another checkpoint, labels outside the model's classes, a class name the model does not have, wrong shapes)",
    ),
    (EXIT_DIVERGED, "training diverged (non-finite loss or gradient); nothing was written"),
    (
        EXIT_OUTPUT,
        "an output cannot be written (exists without --force, is one of the inputs, is a symbolic link or a special file, "
        "folder not writable, disk full)",
    ),
    (EXIT_ENVIRONMENT, "the machine lacks something (device, optional package, network)"),
    (EXIT_GATE, "a quality gate failed (evaluate --fail-under-acc / --fail-over-forgetting)"),
    (
        EXIT_SIGINT,
        "interrupted by SIGINT (Ctrl-C), by any command: its temporary files are removed; "
        "a resumable state is written if --checkpoint-every was given",
    ),
    (
        EXIT_BROKEN_PIPE,
        "the reader of standard output went away (e.g. --json piped into head -c1); cl-tool stops quietly, like other Unix tools",
    ),
    (
        EXIT_SIGTERM,
        "interrupted by SIGTERM, by any command: its temporary files are removed; "
        "a resumable state is written if --checkpoint-every was given",
    ),
]
