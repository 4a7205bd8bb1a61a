"""Command parameters, declared once.

Each command's arguments are one dataclass (``TrainNextArgs``, ...) whose fields are declared with
:func:`option` or :func:`argument`: the flag, the help text and the constraints live in the field's
metadata, next to its type and default. The CLI builds its typer command from these fields (see
``cl_tool.cli.build``), and :class:`Args` validates every value once, where it enters (the CLI and
library callers alike): floats must be finite and within float32's range, integers within int64 (or
the field's bounds), strings among the field's choices. Error messages name parameters as
``$name`` (see :mod:`cl_tool.errors`). No typer or torch import here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import MISSING, dataclass
from pathlib import PurePath
from typing import Any

from cl_tool.errors import BadInputError, OutputError, UsageError, shorten

FLOAT32_MAX = 3.4028234663852886e38
INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Param:
    """How one field appears on the command line and which values it accepts."""

    flags: tuple[str, ...] = ()  # e.g. ("--output", "-o"); empty for an argument
    help: str = ""
    panel: str | None = None  # help section ("Data", "Penalty", ...)
    metavar: str | None = None
    argument: bool = False
    choices: tuple[str, ...] | None = None
    low: float | None = None  # lower bound ...
    low_open: bool = False  # ... excluded
    high: float | None = None  # upper bound ...
    high_open: bool = False  # ... excluded
    group: bool = False  # a nested dataclass whose own fields are options too

    def bounds_text(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low == 0:
            return "a positive number" if self.low_open else "a non-negative number"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {low}"
        return f"{'below' if self.high_open else 'at most'} {high}"


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _field(default: Any, param: Param) -> Any:
    if default is MISSING or default is ...:  # a required option
        return dataclasses.field(metadata={"param": param})
    if isinstance(default, list):  # a mutable default: one fresh list per instance
        return dataclasses.field(default_factory=lambda: list(default), metadata={"param": param})
    return dataclasses.field(default=default, metadata={"param": param})


def option(default: Any, *flags: str, help: str, **kw: Any) -> Any:
    """A command-line option: ``option(0.9, "--sparsity", "-s", help="...", low=0, high=1, high_open=True)``; ``...`` = required."""
    return _field(default, Param(flags=flags, help=help, **kw))


def argument(*, help: str, metavar: str, default: Any = MISSING) -> Any:
    """A positional argument (required unless ``default`` is given)."""
    return _field(default, Param(help=help, metavar=metavar, argument=True))


def group(factory: type) -> Any:
    """A nested dataclass of options shared by several commands (e.g. the data options)."""
    return dataclasses.field(default_factory=factory, metadata={"param": Param(group=True)})


def param_of(f: dataclasses.Field) -> Param | None:
    return f.metadata.get("param")


NAME_MAX = 255  # bytes of one path component (Linux, macOS, Windows file systems)
PATH_MAX = 4095  # bytes of a whole path (Linux's PATH_MAX less the terminating zero)
#: fields that name files or folders a command writes (a bad path there is an output error, exit 6)
OUTPUT_FIELDS = frozenset({"output", "mask_out", "plot", "csv", "si_out", "log_json", "state_file", "cache_dir"})


def path_problem(path: str | os.PathLike) -> str | None:
    """Why no file system can hold ``path`` (a component over NAME_MAX or the whole over PATH_MAX bytes), or None."""
    raw = os.fsencode(path)
    if len(raw) > PATH_MAX:
        return f"is {len(raw):,} bytes long, more than the {PATH_MAX:,} a path may have"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return f"has a name of {len(longest):,} bytes, more than the {NAME_MAX} a file system allows"
    return None


def check_path(name: str, path: str | os.PathLike) -> None:
    """Exit 6 (an output field) or 3 (an input) for a path no file system can hold; ``$name`` names the field."""
    problem = path_problem(path)
    if problem is not None:
        cls = OutputError if name in OUTPUT_FIELDS else BadInputError
        raise cls(f"${name} {shorten(os.fspath(path))} {problem}; give a shorter path.")


def check_value(name: str, value: Any, param: Param) -> None:
    """Raise UsageError (naming ``$name``) unless ``value`` is acceptable for ``param``."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, PurePath):
        check_path(name, value)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_value(name, item, param)
        return
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise UsageError(f"${name} must be a finite number no larger than 3.4e38 in magnitude, got {value}.")
    if isinstance(value, (int, float)) and (param.low is not None or param.high is not None):
        too_low = param.low is not None and (value <= param.low if param.low_open else value < param.low)
        too_high = param.high is not None and (value >= param.high if param.high_open else value > param.high)
        if too_low or too_high:
            raise UsageError(f"${name} must be {param.bounds_text()}, got {value}.")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise UsageError(f"${name} must be an integer from {INT64[0]} to {INT64[1]}, got {value}.")
    if isinstance(value, str) and param.choices is not None and value not in param.choices:
        raise UsageError(f"${name} {value} is unknown; use one of {', '.join(param.choices)}.")


@dataclass(kw_only=True)
class Args:
    """Base of every command's arguments: checks each field against its :class:`Param` on creation."""

    def __post_init__(self) -> None:
        self.notes: list[str] = []  # one-line notes for the user (options that do not apply and are ignored)
        for f in dataclasses.fields(self):
            param = param_of(f)
            if param is not None and not param.group:
                check_value(f.name, getattr(self, f.name), param)
        self.validate()

    def validate(self) -> None:
        """Rules that involve several fields (override)."""

    def ignore_unless(self, applies: bool, names: tuple[str, ...], context: str) -> None:
        """Note (not an error) each of ``names`` that was set away from its default although it does not apply in ``context``."""
        if applies:
            return
        defaults = {
            f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(self)
            if f.name in names
        }
        given = [n for n in names if getattr(self, n) != defaults[n]]
        if given:
            self.notes.append(f"{context} ignores {', '.join('$' + n for n in given)} (not used there).")


def flags_of(args_type: type) -> dict[str, str]:
    """Field name → its long flag (``--name``), through nested groups; arguments map to their metavar."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(args_type):
        param = param_of(f)
        if param is None:
            continue
        if param.group:
            out.update(flags_of(f.default_factory))  # type: ignore[arg-type]
        elif param.argument:
            out[f.name] = param.metavar or f.name.upper()
        else:
            out[f.name] = next((x for x in param.flags if x.startswith("--")), "--" + f.name.replace("_", "-"))
    return out


def force_option() -> Any:
    return option(False, "--force", help="Replace existing output files (never an input).")


def config_option() -> Any:
    return option(
        None,
        "--config",
        metavar="FILE",
        help="TOML (or YAML) file whose keys are this command's option names; command-line options override it.",
    )


def parse_scalar(text: str) -> Any:
    """``true``/``false``/``none`` → bool/None, numbers → int/float, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_key_values(items: list[str], name: str) -> dict[str, Any]:
    """``key=value`` strings (values through :func:`parse_scalar`, finite) → dict; errors name ``$name``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"${name} {item!r} must look like key=value.")
        value = parse_scalar(val.strip())
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"${name} {item!r} must have a finite value.")
        out[key.strip()] = value
    return out


def parse_floats(text: str | None, name: str, count: int) -> tuple[float, ...] | None:
    """Comma-separated finite numbers (one value is repeated ``count`` times); None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"${name} {text!r} must be comma-separated numbers.") from exc
    if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values):
        raise UsageError(f"${name} {text!r} must be finite numbers (within float32's range).")
    values = values * count if len(values) == 1 else values
    if len(values) != count:
        raise UsageError(f"${name} has {len(values)} values but the input has {count} channels.")
    return values
