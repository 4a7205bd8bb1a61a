"""What the user asked for on the command line: ``--data [NAME=]PATH[::key=val,...]`` as a TaskSpec.

No torch, timm or datasets here (``cl-tool --help`` imports this).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_tool.errors import UsageError

IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "pixels", "x", "input", "features")
LABEL_COLUMN_NAMES = ("label", "labels", "target", "targets", "y", "class", "fine_label")
_SPLIT_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)?(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")
TASK_KEYS = ("split", "permute", "rotate", "invert", "limit", "image_column", "label_column", "name")


@dataclass
class TaskSpec:
    """What the user asked for on the command line (one --data)."""

    source: str
    name: str | None = None
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    permute: int | None = None
    rotate: float | None = None
    invert: bool = False
    limit: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name or self.source,
            "source": self.source,
            "split": self.split,
            "transforms": {"rotate": self.rotate, "invert": self.invert, "permute": self.permute},
            "limit": self.limit,
        }


def parse_data_option(value: str) -> tuple[str | None, str]:
    """``name=path`` → (name, path); a plain path → (None, path)."""
    if "=" in value:
        name, _, rest = value.partition("=")
        if re.fullmatch(r"[A-Za-z0-9_.-]+", name) and rest and not Path(value).exists():
            return name, rest
    return None, value


def parse_split(split: str | None) -> tuple[str | None, int | None, int | None]:
    """``train[:8000]`` → ("train", None, 8000); None → (None, None, None)."""
    if not split:
        return None, None, None
    m = _SPLIT_RE.match(split.strip())
    if not m:
        raise UsageError(f"--split {split!r} is not understood; use a split name with an optional slice, e.g. train or train[:8000] or test[-2000:].")
    to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
    return m.group("name"), to_int(m.group("start")), to_int(m.group("stop"))


def parse_task_spec(raw: str, *, split=None, image_column=None, label_column=None, permute=None, rotate=None, invert=False,
                    limit=None) -> TaskSpec:
    """One ``--data [NAME=]PATH[::key=val,...]`` value plus the shared data options → TaskSpec (inline keys win).

    The same rules and messages as ``cl_tool.cli._common.data_specs`` (which may delegate here).
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}.")
    body, _, inline = raw.partition("::")
    name, source = parse_data_option(body)
    opts: dict[str, Any] = {"split": split, "image_column": image_column, "label_column": label_column,
                            "permute": permute, "rotate": rotate, "invert": invert, "limit": limit}
    if inline:
        for item in inline.split(","):
            key, eq, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in TASK_KEYS:
                raise UsageError(f"--data {raw}: unknown per-task key {key!r}; use {', '.join(sorted(TASK_KEYS))}.")
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
    return TaskSpec(source=source, name=name, **opts)
