"""Options and helpers shared by the commands (no torch at import time)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cl_tool.errors import UsageError

# ----- options shared by several commands (same name, same meaning everywhere) -----
DataOpt = Annotated[list[str], typer.Option(
    "--data", "-d", metavar="[NAME=]PATH[::KEY=VAL,...]",
    help="Dataset: a save_to_disk folder, an imagefolder, a parquet/csv/json file or a hub id. Optional NAME= names the task; "
         "optional ::key=val,... sets per-task options (split, permute, rotate, invert, limit, image_column, label_column).")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split name with optional slice, e.g. train, test, train[:8000], train[-2000:].", rich_help_panel="Data")]
ImageColOpt = Annotated[Optional[str], typer.Option("--image-column", help="Image column (default: the Image feature, or image/img/pixels...).", rich_help_panel="Data")]
LabelColOpt = Annotated[Optional[str], typer.Option("--label-column", help="Label column (default: the ClassLabel feature, or label/labels/target...).", rich_help_panel="Data")]
PermuteOpt = Annotated[Optional[int], typer.Option("--permute", metavar="SEED", help="Apply a fixed pixel permutation drawn from SEED (permuted-MNIST tasks).", rich_help_panel="Data")]
RotateOpt = Annotated[Optional[float], typer.Option("--rotate", metavar="DEG", help="Rotate images by DEG degrees counter-clockwise (rotated-MNIST tasks).", rich_help_panel="Data")]
InvertOpt = Annotated[bool, typer.Option("--invert", help="Invert images (x -> 1 - x on the [0,1] scale).", rich_help_panel="Data")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", metavar="N", help="Use only the first N samples (after --split slicing).", rich_help_panel="Data")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; statistics stay in fp32).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Samples per batch.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (logs stay on stderr).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="TOML file whose keys are this command's option names; command-line options override it.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]

_TASK_KEYS = {"split", "permute", "rotate", "invert", "limit", "image_column", "label_column", "name"}


def data_specs(values: list[str], *, split=None, image_column=None, label_column=None, permute=None, rotate=None, invert=False, limit=None) -> list:
    """Turn ``--data`` values plus the shared data options into TaskSpecs (inline ``::k=v`` wins)."""
    from cl_tool.data import TaskSpec, parse_data_option

    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}.")
    specs = []
    for raw in values:
        body, _, inline = raw.partition("::")
        name, source = parse_data_option(body)
        opts: dict[str, Any] = {"split": split, "image_column": image_column, "label_column": label_column,
                                "permute": permute, "rotate": rotate, "invert": invert, "limit": limit}
        if inline:
            for item in inline.split(","):
                key, eq, val = item.partition("=")
                key = key.strip().replace("-", "_")
                if key not in _TASK_KEYS:
                    raise UsageError(f"--data {raw}: unknown per-task key {key!r}; use {', '.join(sorted(_TASK_KEYS))}.")
                if key == "invert":
                    opts[key] = (val.strip().lower() in ("", "1", "true", "yes")) if eq else True
                    continue
                if not eq:
                    raise UsageError(f"--data {raw}: per-task option {key!r} needs a value ({key}=...).")
                try:
                    opts[key] = int(val) if key in ("permute", "limit") else float(val) if key == "rotate" else val
                except ValueError as exc:
                    raise UsageError(f"--data {raw}: {key}={val} is not a number.") from exc
            name = opts.pop("name", None) or name
        opts.pop("name", None)
        if not source:
            raise UsageError("--data needs a path or dataset id.")
        if opts["limit"] is not None and opts["limit"] < 1:
            raise UsageError(f"--data {raw}: limit must be at least 1, got {opts['limit']}.")
        if opts["permute"] is not None and not 0 <= opts["permute"] < 2**63:
            raise UsageError(f"--data {raw}: permute must be a seed in [0, 2**63), got {opts['permute']}.")
        if opts["rotate"] is not None and not math.isfinite(opts["rotate"]):
            raise UsageError(f"--data {raw}: rotate must be a finite number of degrees, got {opts['rotate']}.")
        specs.append(TaskSpec(source=source, name=name, **opts))
    return specs


def parse_shape(text: str | None, option: str = "--input-shape") -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = [p for p in text.lower().replace(",", "x").split("x") if p]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r} is not of the form CxHxW, e.g. 1x28x28.") from exc
    if len(vals) != 3 or min(vals) < 1:
        raise UsageError(f"{option} {text!r} is not of the form CxHxW with positive sizes, e.g. 1x28x28.")
    from cl_tool.models import MAX_INPUT_VALUES

    if vals[0] * vals[1] * vals[2] > MAX_INPUT_VALUES:
        raise UsageError(f"{option} {text!r} has {vals[0] * vals[1] * vals[2]:,} values per sample, more than cl-tool's limit of {MAX_INPUT_VALUES:,}; check the sizes.")
    return vals  # type: ignore[return-value]


def parse_kv(items: list[str], option: str) -> dict[str, Any]:
    """``key=value`` strings → dict; values parsed as int, float, bool, None or kept as strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise UsageError(f"{option} {item!r} must look like key=value.")
        value = _parse_scalar(val.strip())
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{option} {item!r} must have a finite value.")
        out[key.strip()] = value
    return out


def _parse_scalar(val: str) -> Any:
    low = val.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(val)
        except ValueError:
            pass
    return val


def history_entry(command: str, **fields: Any) -> dict[str, Any]:
    import datetime

    from cl_tool import __version__

    entry = {"command": command, "cl_tool": __version__, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    entry.update({k: v for k, v in fields.items() if v is not None})
    return entry


def argv_text() -> str:
    return " ".join(["cl-tool"] + sys.argv[1:])


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


FLOAT32_MAX = 3.4028234663852886e38
#: Integer options with a range narrower than int64 (the generic bound).
INT_RANGES = {"--seed": (0, 2**32 - 1), "--permute": (0, 2**63 - 1)}


def check_number(flag: str, value: Any) -> None:
    """Refuse NaN, ±inf and floats beyond float32's range, and integers out of their option's range (exit 2)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_number(flag, v)
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise UsageError(f"{flag} must be a finite number no larger than 3.4e38 in magnitude, got {value}.")
    elif isinstance(value, int):
        lo, hi = INT_RANGES.get(flag, (-(2**63), 2**63 - 1))
        if not lo <= value <= hi:
            raise UsageError(f"{flag} must be an integer from {lo} to {hi}, got {value}.")


def checked_numbers(command):
    """Wrap a typer command so every numeric option value (from the command line or --config) is checked first."""
    import functools

    flags: dict[str, str] = {}

    def flag_of(name: str) -> str:
        if not flags:
            import inspect

            for param in inspect.signature(command, eval_str=True).parameters.values():
                decls = [m for m in getattr(param.annotation, "__metadata__", ()) if hasattr(m, "param_decls")]
                names = [d for m in decls for d in ((m.default,) if isinstance(m.default, str) else ()) + tuple(m.param_decls or ())]
                flags[param.name] = next((d for d in names if d.startswith("--")), "--" + param.name.replace("_", "-"))
        return flags.get(name, name)

    @functools.wraps(command)
    def run(**kwargs):
        for name, value in kwargs.items():
            if isinstance(value, (int, float, list, tuple)):
                check_number(flag_of(name), value)
        return command(**kwargs)

    return run
