"""How one model's images become pixels: per-sample decode to a uint8 (C, H, W) array at the model's geometry.

Built-in models (``mlp``, ``cnn``) keep the first version's exact rules: PIL images are
converted to L/RGB and resized (bilinear) when their size differs; array columns holding
exactly C·H·W values are reshaped; other 2-D/3-D arrays are turned into 8-bit images and
resized. timm models use timm's eval transform (``timm.data.create_transform(**data_config,
is_training=False, normalize=False)``: resize, centre crop, interpolation from the data config)
for images; flat arrays of exactly C·H·W values are already at the model's geometry and are reshaped.

Pixel scale (never a silent clip): a pixel value v on a scale 0..MAX is the value v / MAX on
[0, 1]. MAX is the task's declared scale (``::scale=MAX`` / ``--pixel-scale MAX``), else read
from the data: 255 for 8-bit images and integer arrays, 65535 for 16-bit and 32-bit integer
images (PIL modes I;16, I;16B, I;16L, I), 1 for float arrays and float images (mode F).
Values outside 0..MAX are refused (exit 3). Over a whole array column (read at open time
with pyarrow, nothing decoded; per batch for a stream) integer values without a declared scale
must also reach at least 128 (half of 0..255): data such as 0..16 is ambiguous. Wide images
become 8-bit as round(255 · v / MAX) (a 16-bit PNG holding 257·v decodes to v, as the 8-bit
PNG holding v); arrays become float32 v / MAX, or stay uint8 for integers on 0..255.

The result is uint8 whenever the pixels are 8-bit (every image, integer arrays on 0..255),
float32 in [0, 1] otherwise; ``uint8 / 255`` in float32 is exactly what the first version
computed. Normalisation, augmentation and task transforms happen later, per batch.
No torch/timm at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cl_tool.errors import BadInputError

FORMAT_VERSION = 2  # bump when decoded pixels change for the same inputs (invalidates decoded caches)
_GEOMETRY_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode")
#: PIL modes whose pixels are wider than 8 bits, and the value that means 1.0 when no scale is declared
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
#: integer pixel data without a declared scale must reach at least this over the task (half of 0..255)
MIN_INTEGER_PEAK = 128


def _num(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e15 else f"{v:.3g}"


def range_problem(
    kind: str, lo: float, hi: float, scale: float | None, *, whole: bool, top: float | None = None
) -> str | None:
    """Why pixel values ``lo``..``hi`` of ``kind`` (int, float, bool) do not fit their scale, or None when they do.

    The scale's maximum is ``scale`` when declared, else ``top`` (what the data's type holds: 65535
    for a 16-bit image), else 255 for integers and 1 for floats and booleans; values must lie in
    [0, maximum]. ``whole``: the values are a whole task (or a stream's first batch), so integers
    without a declared scale must also reach MIN_INTEGER_PEAK. The text continues "<where> has ...".
    """
    import math

    values = f"{'integer ' if kind == 'int' else 'float ' if kind == 'float' else ''}pixel values from {_num(lo)} to {_num(hi)}"

    def declare(example: str) -> str:
        return (
            f"declare the largest value the data can take with ::scale=MAX after the path ({example}) or $scale MAX; "
            f"a pixel value / MAX is its [0, 1] value."
        )

    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "NaN or infinite pixel values; clean the data."
    if scale is not None:
        if lo >= 0 and hi <= scale:
            return None
        return f"{values}, outside the declared scale 0..{_num(scale)} ($scale / ::scale); fix the data or {declare('the scale its values are on')}"
    if lo < 0:
        return f"{values}, but pixel values start at 0 (normalised or signed data is not read); shift the data to start at 0 and {declare('e.g. ::scale=255')}"
    if kind == "int":
        top = top or 255
        if hi > top:
            bits = f"{int(top).bit_length()} bits (0..{_num(top)})"
            example = "e.g. ::scale=65535 for 16-bit data" if top == 255 else f"e.g. ::scale={_num(hi)}"
            return f"{values}, beyond {bits}; {declare(example)}"
        if whole and top == 255 and hi < MIN_INTEGER_PEAK:
            return (
                f"{values}, less than half of 0..255, so their scale is unclear; "
                f"{declare(f'e.g. ::scale={_num(hi)}, or ::scale=255 for dark 8-bit pictures')}"
            )
        return None
    if hi > (top or 1):
        return f"{values}, but float pixels are read on 0..1; {declare(f'e.g. ::scale={_num(math.ceil(hi))}')}"
    return None


def _kind(dtype) -> str:
    import numpy as np

    return "int" if np.issubdtype(dtype, np.integer) else "bool" if dtype.kind == "b" else "float"


def _leaf_values(arr):
    """The numbers of an Arrow array of (nested, fixed-size or extension) lists, flattened; None if not numeric lists."""
    import pyarrow as pa

    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
        if isinstance(arr.type, pa.ExtensionType):
            arr = arr.storage
    t = arr.type
    return arr if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) else None


def column_range(ds, column: str) -> tuple[str, float, float] | None:
    """(kind, min, max) of the numbers in an array column over every row of ``ds`` (min/max NaN if any is NaN).

    Read with ``pyarrow.compute`` in slices of about 16 M values; nothing is decoded. None for a
    column that is not numeric arrays (an Image column, strings).
    """
    import math

    import pyarrow as pa
    import pyarrow.compute as pc

    if type((ds.features or {}).get(column)).__name__ == "Image" or len(ds) == 0:
        return None
    table = ds.select_columns([column]).with_format("arrow")
    first = _leaf_values(pa.chunked_array(table[:1][column]).combine_chunks())
    if first is None:
        return None
    kind = "int" if pa.types.is_integer(first.type) else "float" if pa.types.is_floating(first.type) else "bool"
    rows = max(1, (1 << 24) // max(1, len(first)))
    lo, hi = math.inf, -math.inf
    for batch in table.iter(batch_size=rows):
        for chunk in pa.chunked_array(batch[column]).chunks:
            leaf = _leaf_values(chunk)
            if leaf is None or len(leaf) == 0:
                continue
            if kind == "bool":
                leaf = leaf.cast(pa.uint8())
            if kind == "float" and pc.any(pc.is_nan(leaf)).as_py():
                return kind, math.nan, math.nan
            mm = pc.min_max(leaf)
            if mm["min"].is_valid:
                lo, hi = min(lo, float(mm["min"].as_py())), max(hi, float(mm["max"].as_py()))
    return (kind, lo, hi) if lo <= hi else None


def open_image(value: dict, row: int, source: str):
    """A PIL image from a ``datasets.Image(decode=False)`` value; a file that cannot be decoded is named."""
    import io

    from PIL import Image

    path, data = value.get("path"), value.get("bytes")
    where = f"Image file {path}" if path and data is None else f"The image in row {row} of $data {source}"
    try:
        img = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"{where} cannot be decoded ({msg}); remove or replace it.") from exc
    return img


def _is_pil(value) -> bool:
    return hasattr(value, "convert") and hasattr(value, "size")


def _mode_for(c: int, row: int, source: str) -> str:
    if c not in (1, 3):
        raise BadInputError(
            f"The model takes {c}-channel images, but images in $data {source} (row {row}) can only be read as 1 (L) or 3 (RGB) channels; "
            f"use array data of {c} channels or a matching model."
        )
    return "L" if c == 1 else "RGB"


def _image_of(arr):
    from PIL import Image

    return Image.fromarray(arr)


def _u8_image(arr, top: float):
    """An 8-bit PIL image of an (H, W) or (H, W, C) array of values on 0..``top`` (already checked): round(255 · v / top)."""
    import numpy as np

    u8 = (arr.astype(np.float32) / np.float32(top) * 255).round().astype(np.uint8)
    return _image_of(u8 if u8.ndim == 2 or u8.shape[-1] in (3, 4) else u8[..., 0])


def _pil_to_chw(img, c: int):
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


@dataclass
class Preprocess:
    """How images of one model are turned into tensors (built from the checkpoint's ModelSpec)."""

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = "builtin"  # "builtin" or "timm"
    data_config: dict[str, Any] | None = None  # timm: input_size, interpolation, mean, std, crop_pct, crop_mode
    scale: float | None = None  # the task's declared pixel maximum (None: read from the data, see the module doc)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def for_model(cls, spec) -> Preprocess:
        """From a ``cl_tool.models.ModelSpec``: timm's eval transform from the recorded data config, else the built-in rules."""
        shape = tuple(int(v) for v in spec.input_shape)
        mean, std = tuple(float(v) for v in spec.mean), tuple(float(v) for v in spec.std)
        cfg = getattr(spec, "data_config", None)
        if getattr(spec, "source", "builtin") != "timm" or not cfg:
            # built-in models; and timm checkpoints written before data configs were recorded keep the rules they were trained with
            return cls(shape, mean, std)
        cfg = dict(cfg)
        cfg["input_size"] = (
            shape  # the model's input shape is the authority; normalisation comes from ModelSpec.mean/std
        )
        cfg["mean"], cfg["std"] = mean, std
        return cls(shape, mean, std, kind="timm", data_config=cfg)

    @classmethod
    def builtin(cls, input_shape, mean, std) -> Preprocess:
        return cls(tuple(int(v) for v in input_shape), tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def with_scale(self, scale: float | None) -> Preprocess:
        """This preprocessing for a task whose pixel values run from 0 to ``scale`` (None: the data's own scale)."""
        import dataclasses

        if scale == self.scale:
            return self
        return dataclasses.replace(self, scale=None if scale is None else float(scale), _cache={})

    def check_column(self, ds, column: str, source: str) -> None:
        """Refuse (exit 3) an array column whose values over all rows of ``ds`` do not fit the pixel scale."""
        found = column_range(ds, column)
        if found is not None:
            problem = range_problem(*found, self.scale, whole=True)
            if problem:
                raise BadInputError(f"$data {source} has {problem}")

    def check_batch(self, values, first_row: int, source: str, *, whole: bool) -> None:
        """The same rule for the array values of one batch of a stream (rows from ``first_row``); images are skipped."""
        import numpy as np

        arrays = [
            np.asarray(v)
            for v in values
            if v is not None and not _is_pil(v) and not (isinstance(v, dict) and ("bytes" in v or "path" in v))
        ]
        arrays = [
            a
            for a in arrays
            if a.size and a.dtype != object and (np.issubdtype(a.dtype, np.number) or a.dtype.kind == "b")
        ]
        if not arrays:
            return
        kinds = {_kind(a.dtype) for a in arrays}
        kind = "float" if "float" in kinds else "int" if "int" in kinds else "bool"
        lo = min(float(np.min(a)) for a in arrays)
        hi = max(float(np.max(a)) for a in arrays)
        if any(np.isnan(np.min(a)) for a in arrays if a.dtype.kind == "f"):
            lo = hi = float("nan")
        problem = range_problem(kind, lo, hi, self.scale, whole=whole)
        if problem:
            last = first_row + len(values) - 1
            raise BadInputError(f"$data {source} (streamed rows {first_row}..{last}) has {problem}")

    def key(self) -> dict[str, Any]:
        """What the decoded pixels depend on (part of the decoded cache's key); not mean/std (applied per batch)."""
        import PIL

        k: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "pillow": PIL.__version__,
        }
        if self.kind == "timm":
            import torchvision

            cfg = self.data_config or {}
            k.update(
                {g: (list(cfg[g]) if isinstance(cfg.get(g), (tuple, list)) else cfg.get(g)) for g in _GEOMETRY_KEYS}
            )
            k["torchvision"] = torchvision.__version__
        return k

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    # ------------------------------------------------------------------------------------------- transforms

    def eval_transform(self):
        """timm's eval transform without normalisation (PIL → uint8 tensor); None for built-in models."""
        if self.kind != "timm":
            return None
        if "eval" not in self._cache:
            from timm.data import create_transform

            cfg = dict(self.data_config or {})
            self._cache["eval"] = create_transform(**cfg, is_training=False, normalize=False)
        return self._cache["eval"]

    def train_config(self) -> dict[str, Any]:
        """The data config timm's training transform uses (built-in models: their geometry, bilinear, no crop)."""
        if self.kind == "timm":
            return dict(self.data_config or {})
        return {
            "input_size": self.input_shape,
            "interpolation": "bilinear",
            "mean": self.mean,
            "std": self.std,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }

    def train_transform(self, args: dict[str, Any]):
        """timm's training transform (random-resized-crop, flip, colour jitter, ...) without normalisation: PIL → uint8 tensor."""
        import json

        tag = "train:" + json.dumps(args, sort_keys=True, default=str)
        if tag not in self._cache:
            from timm.data import create_transform

            from cl_tool.errors import UsageError

            try:
                self._cache[tag] = create_transform(**self.train_config(), is_training=True, normalize=False, **args)
            except (TypeError, ValueError, AssertionError, KeyError) as exc:
                raise UsageError(
                    f"timm could not build the training transform with $augment_arg {args}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}."
                ) from exc
        return self._cache[tag]

    # ------------------------------------------------------------------------------------------- decoding

    def to_image(self, value, row: int, source: str):
        """The sample as an 8-bit PIL image in the model's colour mode (arrays become 8-bit images)."""
        c = self.input_shape[0]
        if value is None:
            raise BadInputError(f"Row {row} of $data {source} has no image.")
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            value = open_image(value, row, source)
        if not _is_pil(value):
            h, w = self.input_shape[1:]
            arr = self._numeric(value, row, source)
            top = self._checked_top(arr, row, source)
            if arr.size == c * h * w:
                if arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] == h and c != h:
                    arr = arr.transpose(2, 0, 1)
                arr = arr.reshape(c, h, w).transpose(1, 2, 0)
                arr = arr[..., 0] if c == 1 else arr
            elif arr.ndim not in (2, 3):
                raise BadInputError(
                    f"Image in row {row} of $data {source} has {arr.size} values, but the model needs {c}x{h}x{w}; resize the data or use a matching model."
                )
            return _u8_image(arr, top).convert(_mode_for(c, row, source))
        return self._model_image(value, row, source)

    def _model_image(self, img, row: int, source: str):
        """A PIL image in the model's mode (L/RGB) with 8-bit pixels on their scale (see the module doc)."""
        import numpy as np

        mode = _mode_for(self.input_shape[0], row, source)
        wide = WIDE_MODES.get(img.mode)
        if wide is None:
            img = img.convert(mode)
            if self.scale is None or self.scale == 255:
                return img
            arr, top, kind = np.asarray(img), self.scale, "int"
        else:
            arr, top = np.asarray(img, dtype=np.float64), self.scale or wide
            kind = "float" if img.mode == "F" else "int"
        if arr.size:
            problem = range_problem(kind, float(arr.min()), float(arr.max()), self.scale, whole=False, top=wide)
            if problem:
                raise BadInputError(f"The image in row {row} of $data {source} (PIL mode {img.mode}) has {problem}")
        u8 = np.rint(arr.astype(np.float64) * 255.0 / top).astype(np.uint8)
        return _image_of(u8).convert(mode)

    def _checked_top(self, arr, row: int, source: str) -> float:
        """The value that means 1.0 for this array (the declared scale, else 255 for integers, 1 otherwise); refuses values outside 0..it."""
        import numpy as np

        kind = _kind(arr.dtype)
        top = self.scale if self.scale is not None else (255 if kind == "int" else 1)
        if arr.size:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            problem = range_problem(kind, lo, hi, self.scale, whole=False)
            if problem:
                raise BadInputError(f"Image in row {row} of $data {source} has {problem}")
        return top

    def decode(self, value, row: int, source: str):
        """One sample → numpy (C, H, W) at the model's geometry: uint8, or float32 in [0, 1] for non-8-bit arrays."""
        import numpy as np

        c, h, w = self.input_shape
        if value is None:
            raise BadInputError(f"Row {row} of $data {source} has no image.")
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            value = open_image(value, row, source)
        if _is_pil(value):
            img = self._model_image(value, row, source)
            if self.kind == "timm":
                out = self.eval_transform()(img).numpy()
            else:
                if img.size != (w, h):
                    img = img.resize((w, h), resample=2)  # bilinear
                out = _pil_to_chw(img, c)
            if tuple(out.shape) != (c, h, w):
                raise BadInputError(
                    f"The image in row {row} of $data {source} became {'x'.join(map(str, out.shape))} after preprocessing, "
                    f"but the model needs {c}x{h}x{w}; check the model's data config."
                )
            return np.ascontiguousarray(out)
        arr = self._numeric(value, row, source)
        top = self._checked_top(arr, row, source)
        if arr.size == c * h * w:
            if arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] == h and c != h:
                arr = arr.transpose(2, 0, 1)
            if np.issubdtype(arr.dtype, np.integer) and top == 255:
                return np.ascontiguousarray(arr.astype(np.uint8).reshape(c, h, w))
            return np.ascontiguousarray((arr.astype(np.float32) / np.float32(top)).reshape(c, h, w))
        if arr.ndim in (2, 3):
            return self.decode(_u8_image(arr, top), row, source)
        raise BadInputError(
            f"Image in row {row} of $data {source} has {arr.size} values, but the model needs {c}x{h}x{w}; resize the data or use a matching model."
        )

    @staticmethod
    def _numeric(value, row: int, source: str):
        import numpy as np

        try:
            arr = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise BadInputError(
                f"Image in row {row} of $data {source} is not a regular array; use an Image column or fixed-size pixel arrays."
            ) from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise BadInputError(
                f"Image in row {row} of $data {source} is not a regular array of numbers (dtype {arr.dtype}); use an Image column or fixed-size pixel arrays."
            )
        return arr


def resolve_timm_data_config(arch: str, input_shape, mean, std) -> dict[str, Any]:
    """timm's data config for ``arch`` at ``input_shape`` (interpolation, crop_pct, crop_mode from its pretrained cfg)."""
    import timm
    from timm.data import resolve_data_config

    try:
        pcfg = timm.models.get_pretrained_cfg(arch).to_dict()  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - an architecture without a pretrained cfg: timm's defaults
        pcfg = {}
    cfg = resolve_data_config(
        args={"input_size": tuple(input_shape), "mean": tuple(mean), "std": tuple(std)}, pretrained_cfg=pcfg
    )
    return {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}
