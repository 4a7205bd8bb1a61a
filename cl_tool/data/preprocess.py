"""How one model's images become pixels: per-sample decode to a uint8 (C, H, W) array at the model's geometry.

Built-in models (``mlp``, ``cnn``) keep the first version's exact rules: PIL images are
converted to L/RGB and resized (bilinear) when their size differs; array columns holding
exactly C·H·W values are reshaped (integer arrays are 0..255, float arrays 0..1); other 2-D/3-D
arrays are turned into 8-bit images and resized. timm models use timm's eval transform
(``timm.data.create_transform(**data_config, is_training=False, normalize=False)``: resize,
centre crop, interpolation from the data config) for images; flat arrays of exactly C·H·W
values are already at the model's geometry and are reshaped.

The result is uint8 whenever the pixels are 8-bit (every image, integer arrays within 0..255),
float32 in [0, 1] otherwise; ``uint8 / 255`` in float32 is exactly what the first version
computed. Normalisation, augmentation and task transforms happen later, per batch.
No torch/timm at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cl_tool.errors import BadInputError

FORMAT_VERSION = 1  # bump when decoded pixels change for the same inputs (invalidates decoded caches)
_GEOMETRY_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode")


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
        """The sample as a PIL image in the model's colour mode (arrays become 8-bit images)."""
        import numpy as np
        from PIL import Image

        c = self.input_shape[0]
        if value is None:
            raise BadInputError(f"Row {row} of $data {source} has no image.")
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            value = open_image(value, row, source)
        if not _is_pil(value):
            h, w = self.input_shape[1:]
            arr = self._numeric(value, row, source)
            scale = 255.0 if np.issubdtype(arr.dtype, np.integer) else 1.0
            if arr.size == c * h * w:
                if arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] == h and c != h:
                    arr = arr.transpose(2, 0, 1)
                arr = arr.reshape(c, h, w).transpose(1, 2, 0)
                arr = arr[..., 0] if c == 1 else arr
            elif arr.ndim not in (2, 3):
                raise BadInputError(
                    f"Image in row {row} of $data {source} has {arr.size} values, but the model needs {c}x{h}x{w}; resize the data or use a matching model."
                )
            u8 = (np.clip(arr.astype(np.float32) / scale, 0, 1) * 255).round().astype(np.uint8)
            value = Image.fromarray(u8 if u8.ndim == 2 or u8.shape[-1] in (3, 4) else u8[..., 0])
        return value.convert(_mode_for(c, row, source))

    def decode(self, value, row: int, source: str):
        """One sample → numpy (C, H, W) at the model's geometry: uint8, or float32 in [0, 1] for non-8-bit arrays."""
        import numpy as np

        c, h, w = self.input_shape
        if value is None:
            raise BadInputError(f"Row {row} of $data {source} has no image.")
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            value = open_image(value, row, source)
        if _is_pil(value):
            img = value.convert(_mode_for(c, row, source))
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
        integer = np.issubdtype(arr.dtype, np.integer)
        if arr.size == c * h * w:
            if arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] == h and c != h:
                arr = arr.transpose(2, 0, 1)
            if integer and arr.size and int(arr.min()) >= 0 and int(arr.max()) <= 255:
                return np.ascontiguousarray(arr.astype(np.uint8).reshape(c, h, w))
            out = (arr.astype(np.float32) / (255.0 if integer else 1.0)).reshape(c, h, w)
            if not np.isfinite(out).all():
                raise BadInputError(
                    f"Image in row {row} of $data {source} has NaN or infinite pixel values; clean the data."
                )
            return np.ascontiguousarray(out)
        if arr.ndim in (2, 3):
            from PIL import Image

            hw = arr.astype(np.float32) / (255.0 if integer else 1.0)
            u8 = (np.clip(hw, 0, 1) * 255).round().astype(np.uint8)
            return self.decode(
                Image.fromarray(u8 if u8.ndim == 2 or u8.shape[-1] in (3, 4) else u8[..., 0]), row, source
            )
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
