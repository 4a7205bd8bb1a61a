"""Pruning masks: ``prune --mask-out`` writes them, ``train-next --mask`` keeps pruned weights at zero.

A mask file is a safetensors file with one uint8 tensor per pruned parameter (1 = keep, 0 =
pruned), of the parameter's shape, and metadata ``cl_tool.mask`` = "1", ``by`` (the score),
``scope``, ``sparsity`` and ``fingerprint`` (of the checkpoint the masks were computed for).
Every value must be 0 or 1 (:func:`mask_value_problem`, the one rule ``train-next --mask`` and
``info --verify`` apply): a 2 would double a weight at every step, a 0.5 halve it.
"""

from __future__ import annotations

import os
from typing import Any

from cl_tool.errors import BadInputError, IncompatibleError


def save_mask(
    path: str | os.PathLike,
    masks: dict[str, Any],
    *,
    by: str,
    scope: str,
    sparsity: float,
    fingerprint: str,
    force: bool,
) -> None:
    import torch

    from cl_tool.safetensors_io import save_tensors

    save_tensors(
        path,
        {n: m.to(torch.uint8) for n, m in masks.items()},
        {"cl_tool.mask": "1", "by": by, "scope": scope, "sparsity": repr(sparsity), "fingerprint": fingerprint},
        force=force,
    )


def mask_value_problem(where: str, name: str, t) -> str | None:
    """One sentence if tensor ``t`` (entry ``name`` of the mask ``where``, e.g. "Mask m.safetensors") holds a value
    other than 0 and 1 — NaN and ±Inf included — naming the first such value; None if every value is 0 or 1."""
    bad = ~((t == 0) | (t == 1))
    if not bool(bad.any()):
        return None
    value = t[bad].flatten()[0].item()
    return (
        f"{where} has values other than 0 and 1 in {name!r} (e.g. {value:g}); "
        f"write it again with `cl-tool prune --mask-out`."
    )


def load_mask(path: str | os.PathLike, params: dict[str, Any]) -> dict[str, Any]:
    """The masks of ``path`` as tensors of each parameter's dtype; checked against ``params`` (name → tensor): names and
    shapes (IncompatibleError, exit 4) and values (:func:`mask_value_problem`, BadInputError, exit 3). A parameter
    without an entry is not masked."""
    from cl_tool.safetensors_io import load_tensors

    tensors, meta = load_tensors(path, "Mask file")
    if meta.get("cl_tool.mask") != "1":
        raise BadInputError(f"$mask {path} is not a cl-tool mask file; write one with `cl-tool prune --mask-out`.")
    for name, m in tensors.items():
        if name not in params:
            raise IncompatibleError(f"$mask {path} has an entry for {name!r}, which the model does not have.")
        if tuple(m.shape) != tuple(params[name].shape):
            raise IncompatibleError(
                f"$mask {path}: {name!r} has shape {list(m.shape)}, the parameter {list(params[name].shape)}."
            )
        problem = mask_value_problem(f"$mask {path}", name, m)
        if problem is not None:
            raise BadInputError(problem)
    return {k: v.to(params[k].dtype) for k, v in tensors.items()}
