"""Typer commands built from a workflow's arguments dataclass, so that every option is declared once.

:func:`command` reads the fields of an ``Args`` dataclass (flags, help, help panel, metavar,
default: see :mod:`cl_tool.params`), nested option groups included, and returns a function with
the matching typer signature. Called by typer, it builds the ``Args`` (which validates every
value), the :class:`~cl_tool.output.Output` (``--json``, ``--quiet``) and runs the workflow.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from cl_tool.params import flags_of, param_of


class Command(typer.core.TyperCommand):
    """A typer command whose help follows the click/hf convention: arguments in capitals, no type shown for
    arguments and flags (``--force``, not ``--force <bool>``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def get_params(self, ctx) -> list:
        return _without_types(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """The root command: flags show no type either."""

    def get_params(self, ctx) -> list:
        return _without_types(super().get_params(ctx))


def _without_types(params: list) -> list:
    """Arguments and flags (``--help`` too) are shown without a type column entry."""
    for param in params:
        if param.param_type_name == "argument" or getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None
    return params


#: Set by the root callback from the global ``--quiet``.
QUIET = [False]
#: Field name → flag, for every registered command (used to render ``$name`` in messages).
FLAGS: dict[str, dict[str, str]] = {}
#: Command → the flags (long and short) of its options that take a path (an empty value there is refused).
PATH_FLAGS: dict[str, set[str]] = {}


def _path_flags(args_type: type) -> set[str]:
    """Every flag of ``args_type``'s options (nested groups included) whose type is a Path (optional or a list)."""
    from pathlib import Path

    hints = typing.get_type_hints(args_type)
    out: set[str] = set()
    for f in dataclasses.fields(args_type):
        p = param_of(f)
        if p is None:
            continue
        if p.group:
            out |= _path_flags(f.default_factory)  # type: ignore[arg-type]
        elif not p.argument and _mentions(hints[f.name], Path):
            out.update(p.flags)
    return out


def _mentions(hint: Any, kind: type) -> bool:
    """``hint`` is ``kind`` or a type built from it (``Optional[kind]``, ``list[kind]``, ...)."""
    return hint is kind or any(_mentions(a, kind) for a in typing.get_args(hint))


def empty_path_option(command_name: str | None, argv: list[str]) -> str | None:
    """The first path option of ``argv`` given an empty value (``--cache-dir ''`` or ``--cache-dir=``), or None.

    Click turns "" into the path ".", the current folder; an empty name is never meant as that.
    """
    flags = PATH_FLAGS.get(command_name or "", set())
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a in flags and i + 1 < len(argv) and argv[i + 1] == "":
            return a
        flag, eq, value = a.partition("=")
        if eq and flag in flags and value == "":
            return flag
    return None


def name_of(command_name: str | None) -> Callable[[str], str]:
    """How ``$name`` placeholders are shown while ``command_name`` runs: its flag, another command's, or ``--name``."""
    own = FLAGS.get(command_name or "", {})
    every = {k: v for flags in FLAGS.values() for k, v in flags.items()}
    # $UPPER_CASE names an environment variable (e.g. $CL_TOOL_CACHE), shown as written
    return lambda key: "$" + key if key.isupper() else own.get(key) or every.get(key) or "--" + key.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ...


def _parameters(args_type: type) -> tuple[list[inspect.Parameter], dict[str, tuple[type, list[str]]]]:
    """The typer parameters of ``args_type``'s fields, and its option groups (field → (type, member names))."""
    hints = typing.get_type_hints(args_type)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for f in dataclasses.fields(args_type):
        p = param_of(f)
        if p is None:
            continue
        if p.group:
            inner, _ = _parameters(f.default_factory)  # type: ignore[arg-type]
            groups[f.name] = (f.default_factory, [x.name for x in inner])  # type: ignore[assignment]
            params += inner
            continue
        hint = hints[f.name]
        if p.argument:
            info = typer.Argument(help=p.help, metavar=p.metavar, show_default=False)
        else:
            flag = hint is bool
            info = typer.Option(
                *p.flags,
                help=p.help,
                rich_help_panel=p.panel,
                metavar="" if flag else p.metavar,
                show_default=not flag and _default(f) not in (None, [], ...),
            )
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=_default(f), annotation=Annotated[hint, info]
            )
        )
    return params, groups


def command(name: str, args_type: type, run: str, doc: str) -> Callable[..., Any]:
    """The typer command function of ``name``: its options come from ``args_type``'s fields; it calls the workflow
    ``run`` (``"module:function"``, looked up at each call, so a test may replace it) as ``function(args, out)``."""
    from cl_tool.output import Output

    params, groups = _parameters(args_type)
    params.append(
        inspect.Parameter(
            "json_out",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option("--json", metavar="", help="Print the result as JSON on stdout (logs stay on stderr)."),
            ],
        )
    )
    FLAGS[name] = flags_of(args_type)
    PATH_FLAGS[name] = _path_flags(args_type)

    def invoke(**values: Any) -> Any:
        out = Output(json=values.pop("json_out"), quiet=QUIET[0], name_of=name_of(name))
        for field_name, (group_type, members) in groups.items():
            values[field_name] = group_type(**{m: values.pop(m) for m in members})
        module_name, function_name = run.split(":")
        workflow = getattr(importlib.import_module(module_name), function_name)
        args = args_type(**values)
        for note in args.notes:
            out.log(f"note: {note}")
        return workflow(args, out)

    invoke.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    invoke.__doc__ = doc
    invoke.__name__ = name.replace("-", "_")
    return invoke
