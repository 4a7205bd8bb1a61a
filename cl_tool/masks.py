"""Pruning masks: ``prune --mask-out`` writes them, ``train-next --mask`` keeps pruned weights at zero.

A mask file is a safetensors file with one uint8 tensor per pruned parameter (1 = keep, 0 =
pruned), of the parameter's shape, and metadata ``cl_tool.mask`` = "1", ``by`` (the score),
``scope``, ``sparsity`` and ``fingerprint`` (of the checkpoint the masks were computed for).
Every value must be 0 or 1 (:func:`mask_value_problem`, the one rule ``train-next --mask`` and
``info --verify`` apply): a 2 would double a weight at every step, a 0.5 halve it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cl_tool.errors import BadInputError, IncompatibleError
from cl_tool.lineage import fit_text, generations_text, kinship, target_note, unrelated_text
from cl_tool.safetensors_io import load_tensors, save_tensors, scan_tensors, sparsity_record


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
    import torch  # `info` reads masks without torch

    save_tensors(
        path,
        {n: m.to(torch.uint8) for n, m in masks.items()},
        mask_metadata(by=by, scope=scope, sparsity=sparsity, fingerprint=fingerprint),
        force=force,
    )


def mask_metadata(*, by: str, scope: str, sparsity: float, fingerprint: str) -> dict[str, str]:
    """The metadata of a mask file: the score it was cut by, the scope, the requested sparsity and the fingerprint of
    the checkpoint the masks were computed for."""
    return {"cl_tool.mask": "1", "by": by, "scope": scope, "sparsity": repr(sparsity), "fingerprint": fingerprint}


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


def describe(path: Path, header, meta, *, problems: list[str], verify: bool, sparsity: bool) -> dict[str, Any]:
    """What `cl-tool info` shows of a mask: score, scope, requested sparsity, the checkpoint it was computed for;
    ``sparsity``: the pruned (zero) entries per tensor, ``verify``: every value 0 or 1 (:func:`mask_value_problem`)."""
    try:
        requested = float(meta["sparsity"]) if meta.get("sparsity") not in (None, "None") else None
    except ValueError:
        requested = None
    info = {
        "by": meta.get("by"),
        "scope": meta.get("scope"),
        "requested_sparsity": requested,
        "pruned_from": {"fingerprint": meta.get("fingerprint")},
        "values_checked": None,
    }
    if sparsity or verify:
        scan = scan_tensors(
            path,
            list(header),
            fingerprint=False,
            zeros=set(header) if sparsity else set(),
            check=(lambda name, t: mask_value_problem(f"Mask {path}", name, t)) if verify else None,
        )
        if sparsity:
            info["sparsity"] = sparsity_record(scan["zeros"])  # zeros in a mask = pruned weights
        if verify:
            info["values_checked"] = scan["problem"] is None
            if scan["problem"]:
                problems.append(scan["problem"])
    return info


def relation(info: dict[str, Any], target: dict[str, Any], stored: dict[str, list[int]]) -> dict[str, Any]:
    """``info --for``: whether ``train-next --mask`` may use the mask described by ``info`` (tensor shapes ``stored``)
    on the checkpoint ``target`` (see :func:`cl_tool.checkpoint.lineage_target`), and why."""
    ck, fp = target["path"], info["pruned_from"]["fingerprint"]
    gen, grown = kinship(fp, target["fingerprint"], target["history"])
    problem = fit_text(list(stored), stored, target, grown, every=False)
    if problem:
        reason = f"no: {problem}; train-next --mask refuses it (exit 4)"
        return {"checkpoint": ck, "usable": False, "generations": gen, "reason": reason}
    if gen is None:
        where = (
            f"another checkpoint (fingerprint {fp}), {unrelated_text(target)}, so check that it is the mask you mean"
        )
    else:
        where = f"{ck} itself" if gen == 0 else f"an ancestor of {ck} {generations_text(gen)}"
    reason = f"yes: names and shapes fit train-next --mask; it was computed by pruning {where}{target_note(target)}"
    return {"checkpoint": ck, "usable": True, "generations": gen, "reason": reason}
