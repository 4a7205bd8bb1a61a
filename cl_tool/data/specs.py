"""What the user asked for on the command line: ``--data [NAME=]PATH[::key=val,...]`` as a TaskSpec.

No torch, timm or datasets here (``cl-tool --help`` imports this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.data.cache import CACHE_MODES
from cl_tool.errors import UsageError
from cl_tool.params import Args, check_value, option, param_of

IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "pixels", "x", "input", "features")
LABEL_COLUMN_NAMES = ("label", "labels", "target", "targets", "y", "class", "fine_label")
_SPLIT_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)?(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


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
    sample: int | None = None
    sample_seed: int = 0
    scale: float | None = None  # the largest pixel value (value / scale is its [0, 1] value); None: read from the data
    option: str = "data"  # the parameter it came from (data, eval_data, score_data), for messages
    role: str = "train"  # "train" (training, importance, scoring) or "eval": which split is read by default

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name or self.source,
            "source": self.source,
            "split": self.split,
            "transforms": {"rotate": self.rotate, "invert": self.invert, "permute": self.permute},
            "limit": self.limit,
            **({"sample": self.sample, "sample_seed": self.sample_seed} if self.sample is not None else {}),
            "pixel_scale": self.scale,
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
        raise UsageError(
            f"$split {split!r} is not understood; use a split name with an optional slice, e.g. train or train[:8000] or test[-2000:]."
        )
    to_int = lambda s: int(s) if s not in (None, "") else None
    return m.group("name"), to_int(m.group("start")), to_int(m.group("stop"))


@dataclass(kw_only=True)
class DataOptions(Args):
    """Options that apply to every dataset a command reads (``::key=value`` after one ``--data`` overrides those in TASK_OPTIONS)."""

    split: Optional[str] = option(
        None,
        "--split",
        panel="Data",
        metavar="SPLIT",
        help="Split name with optional slice, e.g. train, test, train[:8000], [8000:] (a single dataset has no named splits).",
    )
    image_column: Optional[str] = option(
        None,
        "--image-column",
        panel="Data",
        metavar="NAME",
        help="Image column (default: the Image feature, or image/img/pixels...).",
    )
    label_column: Optional[str] = option(
        None,
        "--label-column",
        panel="Data",
        metavar="NAME",
        help="Label column (default: the ClassLabel feature, or label/labels/target...).",
    )
    permute: Optional[int] = option(
        None,
        "--permute",
        panel="Data",
        metavar="SEED",
        low=0,
        help="Apply a fixed pixel permutation drawn from SEED (permuted-MNIST tasks).",
    )
    rotate: Optional[float] = option(
        None,
        "--rotate",
        panel="Data",
        metavar="DEG",
        help="Rotate images by DEG degrees counter-clockwise (rotated-MNIST tasks).",
    )
    invert: bool = option(False, "--invert", panel="Data", help="Invert images (x -> 1 - x on the [0,1] scale).")
    limit: Optional[int] = option(
        None,
        "--limit",
        panel="Data",
        metavar="N",
        low=1,
        help="Use only the first N samples (after --split slicing; folders are sorted by class: see --sample).",
    )
    sample: Optional[int] = option(
        None,
        "--sample",
        panel="Data",
        metavar="N",
        low=1,
        help="Use N samples drawn at random from the whole split (after --split slicing), seeded by --sample-seed.",
    )
    sample_seed: int = option(
        0, "--sample-seed", panel="Data", metavar="SEED", low=0, help="Seed of --sample's draw (default 0)."
    )
    scale: Optional[float] = option(
        None,
        "--pixel-scale",
        panel="Data",
        metavar="MAX",
        low=0,
        low_open=True,
        help="The largest pixel value the data can take: a pixel value / MAX is its [0,1] value (default: read from the data: "
        "255 for 8-bit images and integer arrays, 65535 for 16-bit images, 1 for float arrays); values outside 0..MAX are refused.",
    )
    workers: Optional[int] = option(
        None,
        "--workers",
        panel="Data",
        metavar="N",
        low=0,
        high=64,
        help="Data-loading worker processes per process (default: one per CPU, at most 8; under torchrun the "
        "CPUs shared among the local ranks; 0 = in this process, the default with one CPU per process; at most 64).",
    )
    cache: str = option(
        "auto",
        "--cache",
        panel="Data",
        metavar="MODE",
        choices=CACHE_MODES,
        help="Decoded-image cache: auto (a cache file shared by later commands, in memory when small), ram, disk or none.",
    )
    cache_dir: Optional[Path] = option(
        None,
        "--cache-dir",
        panel="Data",
        metavar="DIR",
        help="Folder of the decoded-image cache (default $CL_TOOL_CACHE or ~/.cache/cl-tool/decoded).",
    )
    streaming: bool = option(
        False,
        "--streaming",
        panel="Data",
        help="Read the dataset as a stream (datasets' iterable streaming; for hub datasets).",
    )
    skip_bad_images: bool = option(
        False,
        "--skip-bad-images",
        panel="Data",
        help="Skip images that cannot be decoded (and count them) instead of stopping.",
    )


#: The per-task keys ``--data PATH::key=value`` accepts (these DataOptions, and the task's name).
TASK_OPTIONS = (
    "split",
    "image_column",
    "label_column",
    "permute",
    "rotate",
    "invert",
    "limit",
    "sample",
    "sample_seed",
    "scale",
)

DATA_HELP = (
    "Dataset: a save_to_disk folder, an imagefolder, a parquet/csv/json file or a hub id. Optional NAME= names the task; "
    "optional ::key=val,... sets per-task options (split, permute, rotate, invert, limit, sample, sample_seed, "
    "image_column, label_column, scale=MAX: the largest pixel value, name)."
)
DATA_METAVAR = "[NAME=]PATH[::KEY=VAL,...]"


def task_specs(values: list[str], options: DataOptions, field: str = "data", role: str = "train") -> list[TaskSpec]:
    """One TaskSpec per ``[NAME=]PATH[::key=val,...]`` value of the parameter ``field``; inline keys override ``options``.

    ``role``: "eval" for data a command evaluates on (its default split is the held-out one), "train" otherwise.
    """
    import dataclasses

    params = {f.name: param_of(f) for f in dataclasses.fields(DataOptions) if f.name in TASK_OPTIONS}
    specs = []
    for raw in values:
        body, _, inline = raw.partition("::")
        name, source = parse_data_option(body)
        opts: dict[str, Any] = {k: getattr(options, k) for k in params}
        for item in inline.split(",") if inline else ():
            key, eq, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in params and key != "name":
                raise UsageError(
                    f"${field} {raw}: unknown per-task key {key!r}; use {', '.join(sorted([*params, 'name']))}."
                )
            if key == "invert":
                opts[key] = (val.strip().lower() in ("", "1", "true", "yes")) if eq else True
                continue
            if not eq:
                raise UsageError(f"${field} {raw}: per-task option {key!r} needs a value ({key}=...).")
            try:
                value = (
                    int(val)
                    if key in ("permute", "limit", "sample", "sample_seed")
                    else float(val)
                    if key in ("rotate", "scale")
                    else val
                )
            except ValueError as exc:
                raise UsageError(f"${field} {raw}: {key}={val} is not a number.") from exc
            if key == "name":
                name = value
                continue
            try:
                check_value(key, value, params[key])
            except UsageError as exc:
                raise UsageError(f"${field} {raw}: {exc.render()}") from exc
            opts[key] = value
        if not source:
            raise UsageError(f"${field} needs a path or dataset id.")
        if opts.get("limit") is not None and opts.get("sample") is not None:
            raise UsageError(
                f"${field} {raw}: $limit (the first N rows) and $sample (N random rows) exclude each other; keep one."
            )
        specs.append(TaskSpec(source=source, name=name, option=field, role=role, **opts))
    return specs


def check_unique_names(specs: list[TaskSpec]) -> None:
    """Every task of one option has its own name (its figures are keyed by it): exit 2 naming the first repeated one."""
    names = [s.name or Path(s.source).name or s.source for s in specs]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise UsageError(
            f"Two ${specs[0].option} tasks are named {twice}; each needs its own name for its figures: name them, "
            f"e.g. A=PATH and B=PATH."
        )


def local_paths(specs: list[TaskSpec]) -> list[str]:
    """The sources of ``specs`` that are local files or folders (hub ids are not)."""
    import os

    return [spec.source for spec in specs if os.path.lexists(spec.source)]
