"""Datasets for cl-tool: Hugging Face ``datasets`` in, normalised image tensors out.

``--data`` accepts a folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``), an
``imagefolder`` folder, parquet/csv/json(l) files, or a hub id (online only). An optional
``name=`` prefix names the task (``--data old=./task_a``).

Images become float32 tensors of the model's input shape (C, H, W): PIL images are converted
to L/RGB and resized (bilinear) when their size differs; array columns are reshaped when they
hold exactly C·H·W values (integer arrays are read as 0..255, float arrays as 0..1).
Task-deriving transforms act on the [0, 1] image, in this order: ``--rotate DEG``
(counter-clockwise), ``--invert`` (x → 1 − x), ``--permute SEED`` (one fixed permutation of
the H·W pixel positions, the same for every channel and sample). Then per-channel
normalisation (x − mean) / std from the checkpoint. The whole task is held in memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cl_tool.errors import BadInputError, EnvironmentProblem, UsageError
from cl_tool.params import Args, check_value, option, param_of

IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "pixels", "x", "input", "features")
LABEL_COLUMN_NAMES = ("label", "labels", "target", "targets", "y", "class", "fine_label")
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SPLIT_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)?(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(kw_only=True)
class DataOptions(Args):
    """Options that apply to every dataset a command reads (``::key=value`` after one ``--data`` overrides them)."""

    split: Optional[str] = option(None, "--split", panel="Data", metavar="SPLIT",
                                  help="Split name with optional slice, e.g. train, test, train[:8000], [8000:] (a single dataset has no named splits).")
    image_column: Optional[str] = option(None, "--image-column", panel="Data", metavar="NAME",
                                         help="Image column (default: the Image feature, or image/img/pixels...).")
    label_column: Optional[str] = option(None, "--label-column", panel="Data", metavar="NAME",
                                         help="Label column (default: the ClassLabel feature, or label/labels/target...).")
    permute: Optional[int] = option(None, "--permute", panel="Data", metavar="SEED", low=0,
                                    help="Apply a fixed pixel permutation drawn from SEED (permuted-MNIST tasks).")
    rotate: Optional[float] = option(None, "--rotate", panel="Data", metavar="DEG", help="Rotate images by DEG degrees counter-clockwise (rotated-MNIST tasks).")
    invert: bool = option(False, "--invert", panel="Data", help="Invert images (x -> 1 - x on the [0,1] scale).")
    limit: Optional[int] = option(None, "--limit", panel="Data", metavar="N", low=1, help="Use only the first N samples (after --split slicing).")


DATA_HELP = ("Dataset: a save_to_disk folder, an imagefolder, a parquet/csv/json file or a hub id. Optional NAME= names the task; "
             "optional ::key=val,... sets per-task options (split, permute, rotate, invert, limit, image_column, label_column, name).")
DATA_METAVAR = "[NAME=]PATH[::KEY=VAL,...]"


def task_specs(values: list[str], options: DataOptions, field: str = "data") -> list["TaskSpec"]:
    """One TaskSpec per ``[NAME=]PATH[::key=val,...]`` value of the parameter ``field``; inline keys override ``options``."""
    import dataclasses

    params = {f.name: param_of(f) for f in dataclasses.fields(DataOptions)}
    specs = []
    for raw in values:
        body, _, inline = raw.partition("::")
        name, source = parse_data_option(body)
        opts: dict[str, Any] = {k: getattr(options, k) for k in params}
        for item in inline.split(",") if inline else ():
            key, eq, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in params and key != "name":
                raise UsageError(f"${field} {raw}: unknown per-task key {key!r}; use {', '.join(sorted([*params, 'name']))}.")
            if key == "invert":
                opts[key] = (val.strip().lower() in ("", "1", "true", "yes")) if eq else True
                continue
            if not eq:
                raise UsageError(f"${field} {raw}: per-task option {key!r} needs a value ({key}=...).")
            try:
                value = int(val) if key in ("permute", "limit") else float(val) if key == "rotate" else val
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
        specs.append(TaskSpec(source=source, name=name, option=field, **opts))
    return specs


def local_paths(specs: list["TaskSpec"]) -> list[str]:
    """The sources of ``specs`` that are local files or folders (hub ids are not)."""
    return [spec.source for spec in specs if os.path.lexists(spec.source)]


@dataclass
class TaskSpec:
    """What the user asked for on the command line (one --data)."""

    source: str
    option: str = "data"  # the parameter it came from: data, eval_data or score_data
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


@dataclass
class TaskData:
    x: Any  # float32 (N, C, H, W), normalised
    y: Any  # int64 (N,)
    spec: TaskSpec
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def describe(self) -> dict[str, Any]:
        d = self.spec.describe()
        d.update(self.info)
        d["samples"] = len(self)
        return d


def parse_data_option(value: str) -> tuple[str | None, str]:
    """``name=path`` → (name, path); a plain path → (None, path)."""
    if "=" in value:
        name, _, rest = value.partition("=")
        if re.fullmatch(r"[A-Za-z0-9_.-]+", name) and rest and not Path(value).exists():
            return name, rest
    return None, value


def _parse_split(split: str | None) -> tuple[str | None, int | None, int | None]:
    if not split:
        return None, None, None
    m = _SPLIT_RE.match(split.strip())
    if not m:
        raise UsageError(f"$split {split!r} is not understood; use a split name with an optional slice, e.g. train or train[:8000] or test[-2000:].")
    to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
    return m.group("name"), to_int(m.group("start")), to_int(m.group("stop"))


def _load_raw(source: str, split_name: str | None, option: str = "data"):
    """Return a ``datasets.Dataset`` for ``source`` (and chosen split)."""
    import datasets

    datasets.disable_progress_bars()  # cl-tool shows its own, on terminals only

    p = Path(source)
    if p.exists() and not (p.is_dir() or p.is_file()):
        raise BadInputError(f"${option} {source} is not a regular file or folder (a pipe or device); give a dataset folder or file.")
    try:
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset("imagefolder", data_dir=str(p))
        elif p.is_file():
            builder = _FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise BadInputError(f"${option} {source}: unsupported file type {p.suffix!r}; use a save_to_disk folder, an imagefolder, or parquet/csv/json files.")
            ds = datasets.load_dataset(builder, data_files=str(p))
        elif p.suffix.lower() in _FILE_BUILDERS or source.startswith((".", "/", "~")) or os.sep in source and (
                not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or p.parent.is_dir()):  # `runs/task_b` with ./runs present: a path
            raise BadInputError(f"${option} {source} does not exist; check the path.")
        else:
            ds = _load_hub(source, option)
    except BadInputError:
        raise
    except EnvironmentProblem:
        raise
    except IndexError as exc:  # datasets.load_from_disk of a saved 0-row Dataset (no arrow files)
        raise BadInputError(f"${option} {source} holds no data (an empty dataset); give a non-empty dataset.") from exc
    except (FileNotFoundError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "corresponds to no data" in msg:  # a parquet/csv/json file without rows
            raise BadInputError(f"${option} {source} has no samples; give a non-empty dataset.") from exc
        raise BadInputError(f"${option} {source} could not be read as a dataset ({msg}).") from exc
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split_name is None:
            split_name = "train" if "train" in ds else names[0]
            if len(names) > 1 and "train" not in ds:
                raise UsageError(f"${option} {source} has splits {names}; choose one with $split.")
        if split_name not in ds:
            raise UsageError(f"$split {split_name} is not in ${option} {source}; available splits: {', '.join(names)}.")
        ds = ds[split_name]
    elif split_name is not None:
        own = str(ds.split) if getattr(ds, "split", None) is not None else None
        if split_name != own:
            raise UsageError(f"$split {split_name} is not in ${option} {source}: it holds a single dataset "
                             f"{f'(split {own!r})' if own else 'without named splits'}; drop the split name (a slice such as [:100] works).")
    return ds, split_name


def _load_hub(source: str, option: str = "data"):
    import datasets

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise BadInputError(f"${option} {source} does not exist; check the path.")
    try:
        return datasets.load_dataset(source)
    except Exception as exc:  # noqa: BLE001 - hub failures come in many types
        text = str(exc)
        if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower() or "network" in text.lower() or "Max retries" in text:
            raise EnvironmentProblem(f"${option} {source} is not a local path and the Hugging Face Hub cannot be reached; download it on a connected machine and pass the local folder.") from exc
        raise BadInputError(f"${option} {source} is neither a local path nor a loadable hub dataset ({text.splitlines()[0] if text else type(exc).__name__}).") from exc


def _find_column(ds, wanted: str | None, kind: str, option: str, names: tuple[str, ...], feature_types: tuple[str, ...]) -> str:
    cols = list(ds.column_names)
    if wanted:
        if wanted not in cols:
            raise BadInputError(f"{option} {wanted!r} is not a column of the dataset; its columns are {cols}.")
        return wanted
    for col, feat in ds.features.items():
        if type(feat).__name__ in feature_types:
            return col
    for n in names:
        if n in cols:
            return n
    raise BadInputError(f"The dataset has no {kind} column (columns: {cols}); name it with {option}.")


def _decode_image(value: dict, row: int, source: str):
    """A PIL image from a ``datasets.Image(decode=False)`` value; a file that cannot be decoded is named."""
    import io

    from PIL import Image

    path, data = value.get("path"), value.get("bytes")
    where = f"Image file {path}" if path and data is None else f"The image in row {row} of ${option} {source}"
    try:
        img = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"{where} cannot be decoded ({msg}); remove or replace it.") from exc
    return img


def _to_array(value, c: int, h: int, w: int, row: int, source: str):
    import numpy as np

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = _decode_image(value, row, source)
    if hasattr(value, "convert") and hasattr(value, "size"):  # PIL image
        img = value.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), resample=2)  # bilinear
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return arr[None] if c == 1 else arr.transpose(2, 0, 1)
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise BadInputError(f"Image in row {row} of ${option} {source} is not a regular array; use an Image column or fixed-size pixel arrays.") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise BadInputError(f"Image in row {row} of ${option} {source} is not a regular array of numbers (dtype {arr.dtype}); use an Image column or fixed-size pixel arrays.")
    scale = 255.0 if np.issubdtype(arr.dtype, np.integer) else 1.0
    arr = arr.astype(np.float32) / scale
    if arr.size == c * h * w:
        if arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] == h and c != h:
            arr = arr.transpose(2, 0, 1)
        return arr.reshape(c, h, w)
    if arr.ndim in (2, 3):
        from PIL import Image

        hw = arr if arr.ndim == 2 else arr
        u8 = (np.clip(hw, 0, 1) * 255).round().astype(np.uint8)
        return _to_array(Image.fromarray(u8 if u8.ndim == 2 or u8.shape[-1] in (3, 4) else u8[..., 0]), c, h, w, row, source)
    raise BadInputError(f"Image in row {row} of ${option} {source} has {arr.size} values, but the model needs {c}x{h}x{w}; resize the data or use a matching model.")


def _rotate(x, degrees: float):
    import torch
    import torch.nn.functional as F

    k = degrees / 90.0
    if abs(k - round(k)) < 1e-9:
        return torch.rot90(x, int(round(k)) % 4, dims=(2, 3)) if x.shape[2] == x.shape[3] or int(round(k)) % 2 == 0 else _rotate_general(x, degrees)
    return _rotate_general(x, degrees)


def _rotate_general(x, degrees: float):
    import math

    import torch
    import torch.nn.functional as F

    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), math.sin(t), 0.0], [-math.sin(t), math.cos(t), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixel_permutation(seed: int, n_pixels: int):
    """The fixed permutation of ``n_pixels`` positions that ``--permute SEED`` applies."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_pixels, generator=g)


def apply_task_transforms(x, spec: TaskSpec):
    """Rotate, invert, permute a (N, C, H, W) batch of [0, 1] images as ``spec`` asks."""
    if spec.rotate:
        x = _rotate(x, float(spec.rotate))
    if spec.invert:
        x = 1.0 - x
    if spec.permute is not None:
        n, c, h, w = x.shape
        perm = pixel_permutation(spec.permute, h * w)
        x = x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)
    return x


def load_task(spec: TaskSpec, input_shape: tuple[int, int, int], mean, std, *, progress=None) -> TaskData:
    """Load one task's data as normalised tensors of ``input_shape`` plus int64 labels."""
    import numpy as np
    import torch

    split_name, start, stop = _parse_split(spec.split)
    ds, split_name = _load_raw(spec.source, split_name, spec.option)
    img_col = _find_column(ds, spec.image_column, "image", "$image_column", IMAGE_COLUMN_NAMES, ("Image", "Array2D", "Array3D"))
    lab_col = _find_column(ds, spec.label_column, "label", "$label_column", LABEL_COLUMN_NAMES, ("ClassLabel",))
    if img_col == lab_col:
        raise BadInputError(f"${spec.option} {spec.source}: the image and label columns are both {img_col!r}; set $image_column / $label_column.")
    n_total = len(ds)
    idx = range(n_total)[slice(start, stop)]
    if spec.limit is not None:
        idx = idx[: spec.limit]
    if len(idx) == 0:
        raise BadInputError(f"${spec.option} {spec.source} has no samples{' in the chosen split/slice' if (start, stop) != (None, None) or spec.limit else ''}; give a non-empty dataset.")
    if len(idx) != n_total:
        ds = ds.select(idx)
    c, h, w = input_shape
    xs = np.empty((len(ds), c, h, w), dtype=np.float32)
    ys = np.empty((len(ds),), dtype=np.int64)
    ds = ds.select_columns([img_col, lab_col])
    if type(ds.features[img_col]).__name__ == "Image":  # decode here, so a corrupt file is named
        import datasets

        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    row = 0
    for batch in ds.iter(batch_size=1024):
        for img, lab in zip(batch[img_col], batch[lab_col]):
            if lab is None:
                raise BadInputError(f"Row {row} of ${spec.option} {spec.source} has no label; remove unlabeled rows.")
            try:
                if isinstance(lab, float) and not lab.is_integer():
                    raise ValueError(lab)
                ys[row] = int(lab)
            except (TypeError, ValueError, OverflowError) as exc:
                raise BadInputError(f"Label {lab!r} in row {row} of ${spec.option} {spec.source} is not an integer class id; encode labels as integers or a ClassLabel.") from exc
            if img is None:
                raise BadInputError(f"Row {row} of ${spec.option} {spec.source} has no image.")
            xs[row] = _to_array(img, c, h, w, row, spec.source)
            row += 1
        if progress:
            progress(len(batch[lab_col]))
    bad = ~np.isfinite(xs.reshape(len(xs), -1)).all(axis=1)
    if bad.any():
        raise BadInputError(f"Image in row {int(np.argmax(bad))} of ${spec.option} {spec.source} has NaN or infinite pixel values; clean the data.")
    x = apply_task_transforms(torch.from_numpy(xs), spec)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x - m) / s
    info = {"split": split_name if start is None and stop is None else spec.split, "image_column": img_col, "label_column": lab_col}
    if spec.name is None:
        spec.name = Path(spec.source).name or spec.source
    return TaskData(x=x, y=torch.from_numpy(ys), spec=spec, info=info)


def load_tasks(specs: list[TaskSpec], model_spec, *, num_classes: int | None = None, progress=None) -> list[TaskData]:
    """Every TaskSpec loaded for ``model_spec`` (input shape, normalisation); labels checked against ``num_classes``."""
    tasks = []
    for spec in specs:
        task = load_task(spec, tuple(model_spec.input_shape), model_spec.mean, model_spec.std, progress=progress)
        if num_classes is not None:
            check_labels(task, num_classes)
        tasks.append(task)
    return tasks


def batches_of(x, y, batch_size: int):
    """(x, y) in consecutive batches of ``batch_size`` (the last one may be smaller)."""
    for i in range(0, int(y.shape[0]), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def check_labels(task: TaskData, num_classes: int) -> None:
    """Refuse labels outside [0, num_classes)."""
    lo, hi = int(task.y.min()), int(task.y.max())
    if lo < 0 or hi >= num_classes:
        from cl_tool.errors import IncompatibleError

        bad = hi if hi >= num_classes else lo
        raise IncompatibleError(
            f"${task.spec.option} {task.spec.source} has label {bad}, outside the model's {num_classes} classes (0..{num_classes - 1}); "
            f"use a model with more classes (or $grow_head in train-next)."
        )
