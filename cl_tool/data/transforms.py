"""Batch-level image transforms on [0, 1] float tensors: augmentation, task transforms, normalisation.

Order for every batch: decoded pixels (uint8 /255, or float arrays as 0..1) → augmentation
(training only) → task-deriving transforms ``--rotate``, ``--invert``, ``--permute`` (exact, so a
permuted task is the same permutation of every, augmented, image) → (x − mean) / std.

Augmentation randomness is a pure function of (seed, epoch, sample index): the same sample
gets the same shift in any batch, on any rank, with any number of workers, and a resumed run
draws what the uninterrupted one drew. No torch at import time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from cl_tool.errors import UsageError

AUGMENTS = ("none", "shift=K", "timm")


def _rotate(x, degrees: float):
    import torch

    k = degrees / 90.0
    if abs(k - round(k)) < 1e-9:
        return (
            torch.rot90(x, int(round(k)) % 4, dims=(2, 3))
            if x.shape[2] == x.shape[3] or int(round(k)) % 2 == 0
            else _rotate_general(x, degrees)
        )
    return _rotate_general(x, degrees)


def _rotate_general(x, degrees: float):
    import torch
    import torch.nn.functional as F

    t = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(t), math.sin(t), 0.0], [-math.sin(t), math.cos(t), 0.0]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixel_permutation(seed: int, n_pixels: int):
    """The fixed permutation of ``n_pixels`` positions that ``--permute SEED`` applies."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_pixels, generator=g)


def apply_task_transforms(x, spec):
    """Rotate, invert, permute a (N, C, H, W) batch of [0, 1] images as ``spec`` asks."""
    if spec.rotate:
        x = _rotate(x, float(spec.rotate))
    if spec.invert:
        x = 1.0 - x
    if spec.permute is not None:
        n, c, h, w = x.shape
        perm = pixel_permutation(spec.permute, h * w).to(x.device)
        x = x.reshape(n, c, h * w).index_select(2, perm).reshape(n, c, h, w)  # = [:, :, perm], 3x faster
    return x


def normalise_(x, mean, std):
    """(x − mean) / std per channel, in place on a float32 (N, C, H, W) tensor (the same arithmetic as the first version)."""
    import torch

    if all(float(v) == 0.0 for v in mean) and all(float(v) == 1.0 for v in std):
        return x  # (x − 0) / 1 is x, bit for bit: two passes over the batch saved
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def to_unit_float(x):
    """uint8 pixels → float32 /255 (bit-identical to ``np.asarray(img, float32) / 255.0``); float tensors pass through."""
    import torch

    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32, copy=True)  # a new tensor: later steps work in place


# ----------------------------------------------------------------------------------------------- seeds

_M64 = (1 << 64) - 1


def _splitmix64(z):
    """SplitMix64 finaliser on a numpy uint64 array (wrapping arithmetic)."""
    import numpy as np

    z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_M64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, index, stream: int = 0):
    """A uint64 per sample, a pure function of (seed, epoch, sample index, stream)."""
    import numpy as np

    with np.errstate(over="ignore"):
        base = _splitmix64(
            np.array([(int(seed) * 1_000_003 + int(epoch) * 8191 + int(stream) * 131) & _M64], dtype=np.uint64)
        )[0]
        idx = np.asarray(index, dtype=np.int64).astype(np.uint64)
        return _splitmix64(idx ^ base)


# ----------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """``none`` (kind None), ``shift=K`` or ``timm`` with ``args`` for timm's create_transform."""

    kind: str | None = None
    shift: int = 0
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_source(self) -> bool:
        """True when the augmentation works on the decoded image at its original size (the decoded cache cannot serve it)."""
        return self.kind == "timm"

    def describe(self) -> str:
        if self.kind == "shift":
            return f"shift={self.shift}"
        if self.kind == "timm":
            return "timm" + (f" {json.dumps(self.args, sort_keys=True)}" if self.args else "")
        return "none"


# create_transform arguments a user may set with $augment_arg; geometry and normalisation come from the data config.
_TIMM_AUG_KEYS = {
    "scale",
    "ratio",
    "hflip",
    "vflip",
    "color_jitter",
    "color_jitter_prob",
    "grayscale_prob",
    "gaussian_blur_prob",
    "auto_augment",
    "interpolation",
    "train_crop_mode",
}


def _parse_value(text: str):
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    if "," in t:
        return tuple(_parse_value(p) for p in t.split(",") if p.strip())
    for conv in (int, float):
        try:
            v = conv(t)
        except ValueError:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"$augment_arg value {text!r} is not a finite number.")
        return v
    return t


def check_augment_fits(aug: Augment, input_shape) -> None:
    """UsageError when ``shift=K`` may move a (C, H, W) image by half its smaller side or more: K < min(H, W) / 2.

    Beyond that most of the image can leave the frame (zero fill), and at K ≥ min(H, W) many samples are blank.
    """
    if aug.kind != "shift":
        return
    h, w = int(input_shape[-2]), int(input_shape[-1])
    if 2 * aug.shift >= min(h, w):
        raise UsageError(
            f"$augment shift={aug.shift} may move the model's {h}x{w} images by {aug.shift} pixels, half their "
            f"smaller side or more, leaving mostly blank images; use K below {(min(h, w) + 1) // 2} (a few pixels)."
        )


def parse_augment(value, args=None) -> Augment:
    """``--augment`` (none | shift=K | timm) and ``$augment_arg KEY=VALUE`` (timm only) → Augment."""
    if isinstance(value, Augment):
        return value
    text = (value or "none").strip().lower()
    items = list(args.items()) if isinstance(args, dict) else [a.partition("=")[::2] for a in (args or [])]
    if text == "none":
        if items:
            raise UsageError("$augment_arg only applies with $augment timm; add it or drop $augment_arg.")
        return Augment()
    if text.startswith("shift"):
        _, eq, k = text.partition("=")
        try:
            shift = int(k) if eq else -1
        except ValueError:
            shift = -1
        if shift < 0:
            raise UsageError(
                f"$augment {value} is not understood; use shift=K with K a non-negative number of pixels, e.g. shift=2."
            )
        if items:
            raise UsageError("$augment_arg only applies with $augment timm; add it or drop $augment_arg.")
        return Augment("shift", shift=shift)
    if text == "timm":
        parsed: dict[str, Any] = {}
        for key, val in items:
            key = str(key).strip().replace("-", "_")
            if key not in _TIMM_AUG_KEYS:
                raise UsageError(
                    f"$augment_arg {key} is not a timm augmentation option; use one of {', '.join(sorted(_TIMM_AUG_KEYS))}."
                )
            parsed[key] = _parse_value(val) if isinstance(val, str) else val
        return Augment("timm", args=parsed)
    raise UsageError(f"$augment {value} is unknown; use none, shift=K or timm.")


#: Inputs at most this many pixels on a side are "small" (digits, not photos): timm's photo-scale defaults crop them.
SMALL_INPUT = 64
SMALL_INPUT_SCALE = (0.8, 1.0)


def small_input_augment(augment: Augment, input_shape) -> tuple[Augment, str | None]:
    """``--augment timm`` for a small input (H or W ≤ 64) without ``scale``: RandomResizedCrop's scale (0.8, 1) instead of
    timm's (0.08, 1), which keeps as little as 8 % of a digit's area; and a note saying so (None if unchanged)."""
    if augment.kind != "timm" or "scale" in augment.args or min(int(v) for v in input_shape[1:]) > SMALL_INPUT:
        return augment, None
    note = (
        f"note: the input is {input_shape[1]}x{input_shape[2]} (at most {SMALL_INPUT} px), so $augment timm crops with "
        f"scale {SMALL_INPUT_SCALE[0]:g}-{SMALL_INPUT_SCALE[1]:g} of the image, not timm's photo default 0.08-1 "
        f"($augment_arg scale=0.08,1 restores it)."
    )
    return Augment("timm", args={**augment.args, "scale": SMALL_INPUT_SCALE}), note


def shift_batch(x, index, k: int, seed: int, epoch: int):
    """Translate each image of ``x`` (N, C, H, W) by integers (dy, dx) in [-k, k], zero fill; exact (a copy of pixels)."""
    import torch

    if k <= 0 or x.shape[0] == 0:
        return x
    n, c, h, w = x.shape
    span = 2 * k + 1
    dy = torch.from_numpy((sample_seeds(seed, epoch, index, stream=1) % span).astype("int64") - k).to(x.device)
    dx = torch.from_numpy((sample_seeds(seed, epoch, index, stream=2) % span).astype("int64") - k).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h) - dy.view(n, 1)  # source row of each output row
    cols = torch.arange(w, device=x.device).view(1, w) - dx.view(n, 1)
    valid = ((rows >= 0) & (rows < h)).view(n, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, w)
    src = rows.clamp(0, h - 1).view(n, h, 1) * w + cols.clamp(0, w - 1).view(n, 1, w)
    out = x.reshape(n, c, h * w).gather(2, src.reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)
    return torch.where(valid.view(n, 1, h, w), out, torch.zeros((), dtype=x.dtype, device=x.device))
