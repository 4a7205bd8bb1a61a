"""The ``cl-tool`` command line: one module per command, one error path for all of them.

The commands are built from the workflows' arguments dataclasses (:mod:`cl_tool.cli.build`); this
module registers them, reads ``--config`` files, and turns every known failure into one sentence
(``$name`` placeholders rendered as the command's flags) and its exit code. Importing this package
must not import torch, timm or datasets (``cl-tool --help`` stays fast).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from cl_tool import __version__, distributed, runtime
from cl_tool.cli.build import PATH_FLAGS, QUIET, Command, Group, command, empty_path_option, name_of
from cl_tool.errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ClToolError,
    StdoutGone,
    Terminated,
    UsageError,
    shorten_words,
)
from cl_tool.output import PRINTED, print_json

app = typer.Typer(
    name="cl-tool",
    cls=Group,
    help="Continue training a saved model on a new task without forgetting the old one (stabilized EWC), "
    "compute weight importances, evaluate forgetting and prune - on safetensors checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="Examples:\n\n"
    "  cl-tool init --arch mlp --input-shape 1x28x28 -o a0.safetensors\n\n"
    "  cl-tool train-next a0.safetensors --data ./task_a --penalty none -o a.safetensors\n\n"
    "  cl-tool importance a.safetensors --data ./task_a --method fisher\n\n"
    "  cl-tool train-next a.safetensors --data ./task_b --lambda 200 -o b.safetensors\n\n"
    "  cl-tool evaluate a.safetensors b.safetensors --data A=./task_a --data B=./task_b\n\n"
    "  cl-tool prune b.safetensors --by importance --importance a.importance.safetensors --sparsity 0.9 -o b90.safetensors\n\n"
    "  cl-tool info b90.safetensors\n\n"
    "Global flags: --debug (show tracebacks), --version.",
)


def _version(value: bool):
    if value:
        typer.echo(f"cl-tool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Only errors and warnings on stderr (the result still goes to stdout)."
    ),
):
    """cl-tool: continual learning with stabilized EWC, importances and pruning from the shell."""
    QUIET[0] = quiet


COMMANDS = {
    "init": "init",
    "train-next": "train_next",
    "importance": "importance",
    "evaluate": "evaluate",
    "prune": "prune",
    "info": "info",
    "convert": "convert",
    "demo-data": "demo_data",
    "cache": "cache",
}
DRIVERS = {"batch": "batch"}  # commands that run other command lines (no workflow of their own)


def reflow(epilog: str) -> str:
    """An epilog for the terminal's width: a paragraph's lines joined (rich wraps them), example lines kept."""
    blocks = []
    for block in epilog.strip("\n").split("\n\n"):
        lines = block.split("\n")
        blocks.append(block if any(line.startswith("  ") for line in lines) else " ".join(lines))
    return "\n\n".join(blocks) + "\n"


_REGISTERED: set[str] = set()
_TREE: list = []  # the click command tree of what is registered


def register(names: list[str] | None = None) -> None:
    """Add commands ``names`` (default: all) to ``app``; each command's module is imported on its first registration.

    A command line builds only the command it runs, so it imports only that command's workflow; ``cl-tool --help``
    and an unknown command register all of them.
    """
    import importlib

    for name in [*COMMANDS, *DRIVERS] if names is None else names:
        if name in _REGISTERED:
            continue
        if name in COMMANDS:
            module = importlib.import_module(f"cl_tool.cli.{COMMANDS[name]}")
            app.command(name, epilog=reflow(module.EPILOG), cls=Command)(
                command(name, module.ARGS, module.RUN, module.HELP)  # RUN: "module:function" of the workflow
            )
        else:
            module = importlib.import_module(f"cl_tool.cli.{DRIVERS[name]}")
            app.command(name, epilog=reflow(module.EPILOG), help=module.HELP, cls=Command)(module.RUN)
        _REGISTERED.add(name)
        _TREE.clear()


def _find_command(argv: list[str], names: set[str]) -> str | None:
    for a in argv:
        if a in names:
            return a
        if not a.startswith("-"):
            return None
    return None


def _config_path(argv: list[str]) -> str | None:
    found = []
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a file path.")
            found.append(argv[i + 1])
        elif a.startswith("--config="):
            found.append(a.split("=", 1)[1])
    if len(found) > 1:
        raise UsageError(f"--config was given {len(found)} times ({', '.join(found)}); give one config file.")
    return found[0] if found else None


def config_default_map(command, path: str) -> dict[str, Any]:
    """Read a TOML (or YAML) config for ``command`` and map its keys onto click parameter names."""
    from cl_tool.params import path_problem

    problem = path_problem(path)
    if problem is not None:
        raise UsageError(f"--config {path} {problem}; give a shorter path.")
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path} does not exist or is not a file.")
    text = p.read_bytes()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore
            except ImportError as exc:
                raise UsageError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or use TOML.") from exc
            data = yaml.safe_load(text) or {}
        else:
            import tomllib

            data = tomllib.loads(text.decode("utf-8"))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--config {path} is not valid TOML/YAML ({str(exc).splitlines()[0]}).") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a table of option names and values.")
    if command.name in data and isinstance(data[command.name], dict):
        data = data[command.name]
    by_key: dict[str, Any] = {}
    for param in command.params:
        if param.param_type_name != "option":
            continue
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                by_key[opt[2:]] = param
                by_key[opt[2:].replace("-", "_")] = param
        by_key.setdefault(param.name, param)
    out: dict[str, Any] = {}
    for key, value in data.items():
        param = by_key.get(key)
        if param is None or param.name == "config":
            valid = sorted(
                {
                    o[2:]
                    for prm in command.params
                    if prm.param_type_name == "option"
                    for o in prm.opts
                    if o.startswith("--") and o != "--config"
                }
            )
            raise UsageError(
                f"--config {path}: unknown key {key!r} for {command.name}; valid keys: {', '.join(valid)}."
            )
        if getattr(param, "multiple", False) and not isinstance(value, list):
            value = [value]
        if isinstance(value, (dict,)):
            raise UsageError(f"--config {path}: key {key!r} must be a value, not a table.")
        if value == "" and set(param.opts) & PATH_FLAGS.get(command.name, set()):
            raise UsageError(f"--config {path}: key {key!r} is an empty path; give a file or folder name.")
        _check_config_value(param, key, value, path)
        out[param.name] = value
    return out


def _check_config_value(param, key: str, value: Any, path: str) -> None:
    """Convert ``value`` as the option would, so a wrong type names the config file and key."""
    click = _click()
    try:
        if hasattr(param, "get_runtime_param"):  # typer >= 0.20: its own coercion
            param.get_runtime_param().coerce(value, param=param, ctx=None)
        else:
            for v in value if getattr(param, "multiple", False) else [value]:
                param.type.convert(v, param, None)
    except click.exceptions.BadParameter as exc:
        option = next((o for o in param.opts if o.startswith("--")), param.name)
        raise UsageError(
            f"--config {path}: key {key!r} ({option}) has an invalid value {value!r} ({exc.message.rstrip('.')}); fix it in the file."
        ) from exc
    except Exception:  # noqa: BLE001 - a type that needs a context: the option's own check reports it later
        return


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn known failures into one sentence and an exit code."""
    with signals_unwind():
        code = run_line(list(sys.argv[1:] if argv is None else argv))
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        code = code or _stdout_gone()
    sys.exit(code)


def run_line(argv: list[str], *, last: bool = True) -> int:
    """Run one cl-tool command line in this process and return its exit code (errors already printed).

    ``last``: nothing runs after it in this process (a ``batch`` keeps the process group for its next line).
    """
    click = _click()
    runtime.mark_start()
    _ensure_std_streams()
    argv = list(argv)
    debug = "--debug" in argv or os.environ.get("CL_TOOL_DEBUG") == "1"
    if "-q" in argv or "--quiet" in argv:  # global flags, accepted anywhere on the line
        argv = ["--quiet"] + [a for a in argv if a not in ("-q", "--quiet")]
    argv = [a for a in argv if a != "--debug"]
    runtime.set_debug(debug)
    code = 0
    cmd_name = None
    failure: list = []  # (class name, message, result) of the failure, for the JSON error document
    wants_json = "--json" in (argv[: argv.index("--")] if "--" in argv else argv)
    PRINTED[0] = False
    try:
        cmd_name = _find_command(argv, {*COMMANDS, *DRIVERS})
        group = _command_tree(cmd_name)
        extra: dict[str, Any] = {}
        empty = empty_path_option(cmd_name, argv)
        if empty is not None:
            raise UsageError(f"{empty} was given an empty path; give a file or folder name (. for the current folder).")
        cfg = _config_path(argv) if cmd_name else None
        if cmd_name and cfg and not any(a in ("-h", "--help") for a in argv):
            extra["default_map"] = {cmd_name: config_default_map(group.commands[cmd_name], cfg)}  # type: ignore[attr-defined]
        rv = group.main(args=argv, prog_name="cl-tool", standalone_mode=False, **extra)
        code = rv if isinstance(rv, int) else 0
        if (
            code == EXIT_SIGINT
        ):  # typer turns a KeyboardInterrupt (Ctrl-C outside the training loop) into exit 130, silently
            failure[:] = ["Interrupted", _print_error("Interrupted by Ctrl-C; nothing was written."), None]
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        code = EXIT_SIGINT
        failure[:] = ["Interrupted", "Interrupted; nothing was written.", None]
    except click.exceptions.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        failure[:] = ["UsageError", _print_error(exc.format_message().rstrip(".") + hint + "."), None]
        code = exc.exit_code
    except click.exceptions.ClickException as exc:
        failure[:] = ["UsageError", _print_error(exc.format_message()), None]
        code = exc.exit_code
    except ClToolError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        if exc.message:
            failure[:] = [type(exc).__name__, _print_error(exc.render(name_of(cmd_name))), exc.result]
        code = _stdout_gone() if isinstance(exc, StdoutGone) else exc.exit_code
    except KeyboardInterrupt:
        failure[:] = ["Interrupted", _print_error("Interrupted; nothing was written."), None]
        code = EXIT_SIGINT
    except Terminated:
        failure[:] = ["Terminated", _print_error("Interrupted by SIGTERM; nothing was written."), None]
        code = EXIT_SIGTERM
    except OSError as exc:
        if debug:
            raise
        if exc.filename is None:
            failure[:] = ["InternalError", _print_error(_internal(exc)), None]
            code = EXIT_INTERNAL
        else:  # a path the checks above did not foresee (a loop of links, a name too long, ...)
            message = f"Cannot use the path {exc.filename}: {exc.strerror or exc}; check it and run again."
            failure[:] = ["BadInputError", _print_error(message), None]
            code = EXIT_BAD_INPUT
    except Exception as exc:
        if debug:
            raise
        failure[:] = ["InternalError", _print_error(_internal(exc)), None]
        code = EXIT_INTERNAL
    finally:
        if last:
            distributed.shutdown()
    if code and wants_json and failure and not PRINTED[0]:
        code = _print_json_error(code, *failure) or code
    return code


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up that follows is not cut short by a second one
    raise Terminated()


@contextlib.contextmanager
def signals_unwind():
    """While a command runs, SIGTERM raises :class:`Terminated` and SIGINT KeyboardInterrupt (exit 143 and 130).

    Python's default SIGTERM kills the process at once (status -15), skipping every clean-up: temporary outputs,
    the decoded cache's unfinished file, data workers. As an exception the command unwinds through them. SIGINT
    keeps Python's handler (KeyboardInterrupt), or stays ignored when the caller ignored it (``nohup``, ``&``).
    The training loop installs its own handlers for its resumable stop and restores these after.
    """
    try:
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals to the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _internal(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"Internal error ({type(exc).__name__}: {first}); rerun with --debug and report the traceback."


def error_document(code: int, cls: str, message: str, result: Any = None) -> dict[str, Any]:
    """The JSON document of a failed command: ``{"error": {code, class, message}}``, merged into its result so far
    when that is a dict (e.g. evaluate's matrix and gate verdict), else beside it as ``"result"``."""
    error = {"error": {"code": code, "class": cls, "message": message}}
    if isinstance(result, dict):
        return {**result, **error}
    return error if result is None else {**error, "result": result}


def _print_json_error(code: int, cls: str, message: str, result: Any) -> int | None:
    """Print the error document on stdout; 141 if stdout's reader went away."""
    try:
        print_json(error_document(code, cls, message, result))
    except StdoutGone:
        return _stdout_gone()
    return None


def _ensure_std_streams() -> None:
    """A closed stdout/stderr (`>&-`) becomes /dev/null: output is dropped instead of failing the command."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None:
            try:
                fd = stream.fileno()
            except (OSError, ValueError, AttributeError):  # not backed by a file descriptor (captured): leave it
                continue
            try:
                os.fstat(fd)
                continue
            except OSError:
                pass
        setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - lives as long as the process


def _stdout_gone() -> int:
    """Point stdout at /dev/null (so the interpreter's final flush cannot fail) and return 128 + SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_BROKEN_PIPE


def _command_tree(name: str | None = None):
    """typer's click command tree for ``app`` with command ``name`` (None: every command) registered; built again only
    when a command was added (in-process callers reuse it)."""
    register(None if name is None else [name])
    if not _TREE:
        _TREE.append(typer.main.get_command(app))
    return _TREE[0]


def _click():
    """The click that typer uses (recent typer vendors it as typer._click)."""
    try:
        from typer import _click as click  # type: ignore[attr-defined]
    except ImportError:  # typer < 0.20 uses the click package
        import click
    return click


def _print_error(message: str) -> str:
    """``Error: message`` on stderr, long words (paths, quoted values) shortened to their two ends; returns it."""
    message = "\n".join(shorten_words(line) for line in message.split("\n"))
    try:
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError, ValueError):  # nobody reads stderr any more
        pass
    return message


__all__ = ["app", "main", "config_default_map"]
