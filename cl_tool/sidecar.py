"""Sidecar importance files: ``<checkpoint stem>.importance.safetensors``.

One float32 tensor Ω per trainable parameter name of the checkpoint, and in
``__metadata__``:

- ``cl_tool.sidecar``: ``"1"``
- ``method`` (fisher, mas, si, signal, magnitude) and ``options`` (JSON: label mode, output, ξ, ...)
- ``data``: JSON description of the data it was computed on (path, split, transforms, samples)
- ``fingerprint``: fingerprint of the checkpoint whose parameters θ* it belongs to
- ``tasks``: JSON list of every task accumulated into Ω so far (oldest first)
- ``decay``: γ of the last accumulation (Ω = γ·Ω_prev + Ω_new; 1 = plain sum, the paper's rule)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_tool.errors import BadInputError, IncompatibleError
from cl_tool.lineage import fit_text, generations_text, kinship, sidecar_owner, target_note, unrelated_text
from cl_tool.safetensors_io import load_tensors, save_tensors, scan_tensors

SUFFIX = ".importance.safetensors"


def default_sidecar_path(checkpoint_path: str | os.PathLike) -> Path:
    """``a.safetensors`` → ``a.importance.safetensors``; a timm folder ``m/`` → ``m.importance.safetensors``."""
    p = Path(checkpoint_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + SUFFIX)


@dataclass
class Sidecar:
    tensors: dict[str, Any]
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    fingerprint: str = ""
    tasks: list[dict[str, Any]] = field(default_factory=list)
    decay: float = 1.0
    path: str | None = None


def save_sidecar(path: str | os.PathLike, sc: Sidecar, *, force: bool = False) -> None:
    validate_values(sc.tensors, str(path))
    metadata = {
        "cl_tool.sidecar": "1",
        "method": sc.method,
        "options": json.dumps(sc.options),
        "data": json.dumps(sc.data),
        "fingerprint": sc.fingerprint,
        "tasks": json.dumps(sc.tasks),
        "decay": repr(float(sc.decay)),
    }
    save_tensors(path, {k: v.float() for k, v in sc.tensors.items()}, metadata, force=force)


def value_problem(name: str, t, where: str, isfinite=None) -> str | None:
    """One sentence if the importances ``t`` of ``name`` hold NaN, ±Inf or a negative value; None if they are valid.
    ``isfinite``: the element-wise test for ``t``'s kind (default ``torch.isfinite``; ``numpy.isfinite`` for arrays)."""
    if isfinite is None:
        import torch  # header-only `info` imports no torch

        isfinite = torch.isfinite
    if not isfinite(t).all():
        return f"Importance of {name!r} in {where} contains NaN or Inf; recompute it (lower $lr or check the data) instead of using it."
    if (t < 0).any():
        return f"Importance of {name!r} in {where} has negative values; importances must be non-negative, recompute it."
    return None


def validate_values(tensors: dict[str, Any], where: str) -> None:
    """Refuse NaN, Inf or negative importances, naming the first offending tensor."""
    for name, t in tensors.items():
        problem = value_problem(name, t, where)
        if problem is not None:
            raise BadInputError(problem)


def load_sidecar(path: str | os.PathLike) -> Sidecar:
    """The sidecar at ``path``, its values checked (finite, non-negative) and its metadata validated."""
    tensors, meta = load_tensors(path, "Importance file")
    sc = sidecar_from_metadata(meta, path)
    sc.tensors = {k: v.float() for k, v in tensors.items()}
    validate_values(sc.tensors, str(path))
    return sc


def sidecar_from_metadata(meta: dict[str, str], path: str | os.PathLike) -> Sidecar:
    """A Sidecar with the metadata of ``path`` and no tensors yet (exit 3 if it is not a valid sidecar's)."""
    if meta.get("cl_tool.sidecar") != "1":
        if "cl_tool.model" in meta:
            raise BadInputError(
                f"{path} is a checkpoint, not an importance sidecar; pass the .importance.safetensors file written by `cl-tool importance`."
            )
        raise BadInputError(
            f"{path} is not a cl-tool importance sidecar (no 'cl_tool.sidecar' metadata); create it with `cl-tool importance`."
        )
    try:
        sc = Sidecar(
            tensors={},
            method=meta["method"],
            options=json.loads(meta.get("options", "{}")),
            data=json.loads(meta.get("data", "null")),
            fingerprint=meta["fingerprint"],
            tasks=json.loads(meta.get("tasks", "[]")),
            decay=float(meta.get("decay", "1.0")),
            path=str(path),
        )
    except KeyError as exc:
        raise BadInputError(
            f"Importance file {path} lacks the metadata key {exc.args[0]!r}; recompute it with `cl-tool importance`."
        ) from exc
    except (ValueError, json.JSONDecodeError, RecursionError) as exc:
        raise BadInputError(
            f"Importance file {path} has malformed metadata ({str(exc)[:200]}); recompute it with `cl-tool importance`."
        ) from exc
    if (
        not isinstance(sc.options, dict)
        or not isinstance(sc.tasks, list)
        or not all(isinstance(t, dict) for t in sc.tasks)
        or not (sc.data is None or isinstance(sc.data, dict))
    ):
        raise BadInputError(
            f"Importance file {path} has malformed metadata (options, data or tasks of the wrong type); recompute it with `cl-tool importance`."
        )
    return sc


def check_names(path: str | os.PathLike, names: Iterable[str], parameters: Iterable[str], checkpoint_path: str) -> None:
    """A sidecar holds one tensor per trainable parameter, no more, no fewer: IncompatibleError (exit 4) otherwise.

    The one rule of every reader (train-next, prune in memory and streaming), as a mask with an entry the model
    lacks is refused.
    """
    names, parameters = list(names), list(parameters)
    have, wanted = set(names), set(parameters)
    extra = next((n for n in names if n not in wanted), None)
    if extra is not None:
        raise IncompatibleError(
            f"Importance file {path} has an entry for {extra!r}, which {checkpoint_path} does not have as a trainable "
            f"parameter; recompute it for this checkpoint."
        )
    missing = next((n for n in parameters if n not in have), None)
    if missing is not None:
        raise IncompatibleError(
            f"Importance file {path} has no entry for parameter {missing!r} of {checkpoint_path}; recompute it for this checkpoint."
        )


def check_covers(sc: Sidecar, named_params: dict[str, Any], checkpoint_path: str) -> None:
    """Exactly one importance tensor of its shape per trainable parameter (see :func:`check_names`)."""
    check_names(sc.path, sc.tensors, named_params, checkpoint_path)
    for name, p in named_params.items():
        if tuple(sc.tensors[name].shape) != tuple(p.shape):
            raise IncompatibleError(
                f"Importance of {name!r} in {sc.path} has shape {list(sc.tensors[name].shape)}, but the parameter has {list(p.shape)}; recompute it for this checkpoint."
            )


def combine(prev: Sidecar, new: dict[str, Any], decay: float) -> dict[str, Any]:
    """Ω = γ·Ω_prev + Ω_new (γ = 1: the paper's multi-task sum; γ < 1: online EWC)."""
    out = {}
    extra = next((n for n in prev.tensors if n not in new), None)
    if extra is not None:
        raise IncompatibleError(
            f"$accumulate {prev.path} has an entry for {extra!r}, which this checkpoint does not have as a trainable "
            f"parameter; it was computed for a different architecture."
        )
    for name, t in new.items():
        if name not in prev.tensors:
            raise IncompatibleError(
                f"$accumulate {prev.path} has no entry for parameter {name!r}; it was computed for a different architecture."
            )
        if prev.tensors[name].shape != t.shape:
            raise IncompatibleError(
                f"$accumulate {prev.path}: parameter {name!r} has shape {list(prev.tensors[name].shape)} there but {list(t.shape)} here."
            )
        out[name] = decay * prev.tensors[name] + t
    return out


# ----------------------------------------------------------------- what `cl-tool info` shows


def _task_row(t: dict[str, Any]) -> dict[str, Any]:
    data = t.get("data")
    return {
        "method": t.get("method"),
        "data": (data or {}).get("name") if isinstance(data, dict) else data,
        "samples": (data or {}).get("samples") if isinstance(data, dict) else None,
        "checkpoint": t.get("checkpoint"),
        "fingerprint": t.get("fingerprint"),
    }


def describe(path: Path, header, meta, *, problems: list[str], verify: bool, sparsity: bool) -> dict[str, Any]:
    """What `cl-tool info` shows of a sidecar: method, data, tasks, decay, the checkpoint it belongs to; ``verify``:
    its values checked (:func:`value_problem`). Problems found go to ``problems``."""
    sc = sidecar_from_metadata(meta, path)
    info = {
        "method": sc.method,
        "options": sc.options,
        "data": sc.data,
        "samples": sc.data.get("samples") if isinstance(sc.data, dict) else None,
        "tasks": [_task_row(t) for t in sc.tasks],
        "decay": sc.decay,
        "belongs_to": {"fingerprint": sc.fingerprint, "checkpoint": sidecar_owner(sc)},
        "values_checked": None,
    }
    if verify:
        scan = scan_tensors(
            path, list(header), fingerprint=False, zeros=set(), check=lambda n, t: value_problem(n, t, str(path))
        )
        info["values_checked"] = scan["problem"] is None
        if scan["problem"]:
            problems.append(scan["problem"])
    return info


def relation(info: dict[str, Any], target: dict[str, Any], stored: dict[str, list[int]]) -> dict[str, Any]:
    """``info --for``: whether the checkpoint ``target`` (see :func:`cl_tool.checkpoint.lineage_target`) may use the
    sidecar described by ``info``, whose tensors have the shapes ``stored``, and why; as prune and train-next judge."""
    ck, fp = target["path"], info["belongs_to"]["fingerprint"]
    note = target_note(target)
    gen, grown = kinship(fp, target["fingerprint"], target["history"])
    if gen is None:
        reason = (
            f"no: it belongs to another checkpoint (fingerprint {fp}), {unrelated_text(target)}; "
            f"prune and train-next refuse it (exit 4){note}"
        )
        return {"checkpoint": ck, "usable": False, "generations": None, "reason": reason}
    names = target["params"] if target["params"] is not None else list(stored)
    problem = fit_text(names, stored, target, grown, every=True)
    if problem:
        whose = "it" if gen == 0 else "its ancestor " + generations_text(gen)
        reason = f"no: it belongs to {whose}, but {problem}; recompute it with `cl-tool importance {ck}`"
    elif gen == 0:
        reason = f"yes: it was computed for {ck} itself (the fingerprints match){note}"
    else:
        reason = (
            f"yes: it was computed for an ancestor of {ck} {generations_text(gen)}, per the history {ck} records"
            + (f"; the rows --grow-head added since ({', '.join(sorted(grown))}) score 0" if grown else "")
            + note
        )
    return {"checkpoint": ck, "usable": not problem, "generations": gen, "reason": reason}
