"""What ``cl-tool info`` does: describe the files cl-tool reads and writes, from their headers.

Kinds: a checkpoint (``cl_tool.model`` metadata), an importance sidecar (``cl_tool.sidecar``), a
mask (``cl_tool.mask``, from ``prune --mask-out``), a resumable training state (``cl_tool.resume``)
and a timm folder (``config.json`` + ``model.safetensors``). Only the safetensors header is read
(tensor names, dtypes, shapes, metadata), so this is fast on large files and imports no torch;
``--verify`` and ``--sparsity`` read the tensors, one at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.checkpoint import (
    HISTORY_LIMIT,
    LINEAGE_LIMIT,
    layout_from_metadata,
    layout_problem,
    metadata_json,
    spec_from_metadata,
)
from cl_tool.errors import BadInputError, UsageError
from cl_tool.output import Output, human_bytes
from cl_tool.params import Args, argument, config_option, option
from cl_tool.safetensors_io import DTYPE_NAMES

SHOWN_ROWS = 20  # history entries and ancestors printed (--json: HISTORY_LIMIT entries, LINEAGE_LIMIT ancestors)
CELL_CHARS = 80  # a longer text of a history entry is cut to this in the table
_FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
KINDS = {
    "checkpoint": "cl-tool checkpoint",
    "timm-folder": "timm model folder",
    "sidecar": "importance sidecar",
    "mask": "pruning mask",
    "resume": "resumable training state",
}


@dataclass(kw_only=True)
class InfoArgs(Args):
    paths: list[Path] = argument(
        metavar="PATH...", help="Checkpoints, importance sidecars, masks, resume states or timm folders."
    )
    for_checkpoint: Optional[Path] = option(
        None,
        "--for",
        metavar="CKPT",
        help="Say whether checkpoint CKPT may use the sidecar (mask, resume state) in PATHS, and why.",
    )
    verify: bool = option(
        False,
        "--verify",
        help="Read the tensors: recompute a checkpoint's fingerprint and compare it with the recorded one; check a "
        "sidecar's values (finite, non-negative) and a mask's (0/1). Exit 3 on a mismatch.",
    )
    sparsity: bool = option(
        False,
        "--sparsity",
        help="Read the tensors: fraction of zero weights per parameter tensor (of pruned weights for a mask).",
    )
    config: Optional[Path] = config_option()


# ----------------------------------------------------------------- header-only helpers


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _nbytes(entry: dict[str, Any]) -> int:
    start, end = entry["data_offsets"]
    return int(end) - int(start)


def tensor_summary(header: dict[str, Any]) -> dict[str, Any]:
    """Counts, values and bytes of a file's tensors, in total and by dtype (from the header alone)."""
    by_dtype: dict[str, dict[str, int]] = {}
    for entry in header.values():
        d = by_dtype.setdefault(
            DTYPE_NAMES.get(entry["dtype"], entry["dtype"]), {"tensors": 0, "values": 0, "bytes": 0}
        )
        d["tensors"] += 1
        d["values"] += _numel(entry["shape"])
        d["bytes"] += _nbytes(entry)
    return {
        "count": len(header),
        "values": sum(d["values"] for d in by_dtype.values()),
        "bytes": sum(d["bytes"] for d in by_dtype.values()),
        "by_dtype": by_dtype,
    }


def _not_cl_tool(p: Path) -> BadInputError:
    hint = ""
    if p.name == "model.safetensors" and (p.parent / "config.json").is_file():
        hint = f" (for a timm folder give the folder {p.parent})"
    return BadInputError(
        f"{p} is a safetensors file without cl-tool metadata{hint}; `cl-tool info` describes checkpoints, importance sidecars, "
        f"masks and resume states written by cl-tool, and timm folders (config.json + model.safetensors)."
    )


def _omega_text(e: dict[str, Any]) -> str | None:
    if not e.get("importance"):
        return None
    gen = e.get("importance_generations")
    return f"Ω {e['importance']}" + (f" ({gen} back)" if isinstance(gen, int) and gen > 0 else "")


def _short_time(t: Any) -> str:
    return t[:16].replace("T", " ") if isinstance(t, str) else ""


def _clip(text: Any) -> Any:
    return text[: CELL_CHARS - 1] + "…" if isinstance(text, str) and len(text) > CELL_CHARS else text


def _history_rows(history: list[Any]) -> list[dict[str, Any]]:
    """The history as short records: command, data, penalty, λ, a detail, time (texts cut to CELL_CHARS)."""
    rows = []
    for e in history:
        e = e if isinstance(e, dict) else {}
        cmd = str(e.get("command", "?"))
        data = e.get("data")
        data_text = (
            (data.get("name") or data.get("source")) if isinstance(data, dict) else (str(data) if data else None)
        )
        detail = None
        if cmd == "train-next":
            bits = [
                _omega_text(e),
                f"grew {', '.join(map(str, e['grown']))}" if isinstance(e.get("grown"), list) else None,
                f"mask {e['mask']}" if e.get("mask") else None,
            ]
            detail = "; ".join(b for b in bits if b)
        elif cmd == "prune":
            achieved = e.get("achieved", e.get("sparsity"))
            bits = [
                f"{e.get('by')} {achieved:.1%}" if isinstance(achieved, (int, float)) else f"{e.get('by')}",
                _omega_text(e),
            ]
            detail = "; ".join(b for b in bits if b)
        elif cmd == "import":
            detail = f"from {e.get('from')}"
        rows.append(
            {
                "command": _clip(cmd),
                "data": _clip(data_text),
                "penalty": _clip(e.get("penalty")),
                "lambda": _clip(e.get("lambda")),
                "detail": _clip(detail) or None,
                "time": _clip(e.get("time")),
                "entry": e,  # the entry as stored (split, epochs, lr, command line, ...)
            }
        )
    return rows


def _history_record(history: list[Any], info: dict[str, Any]) -> None:
    """The newest HISTORY_LIMIT entries as rows, the newest LINEAGE_LIMIT ancestors, and how many entries exist."""
    from cl_tool.lineage import ancestors

    first = history[0] if history and isinstance(history[0], dict) else {}
    dropped = first.get("dropped_before")
    info["history_entries"] = len(history)
    info["history_dropped"] = dropped if isinstance(dropped, int) and not isinstance(dropped, bool) else 0
    info["history"] = _history_rows(history[-HISTORY_LIMIT:])
    info["lineage"] = [
        {
            "generations": anc.generations,
            "fingerprint": _clip(anc.fingerprint),
            "read_by": _clip(anc.command),
            "time": _clip(anc.time),
        }
        for anc in ancestors(history[-LINEAGE_LIMIT:])
    ]


# ----------------------------------------------------------------- reading tensors (--verify, --sparsity)


def _scan(path: Path, names: list[str], *, fingerprint: bool, zeros: set[str], check=None) -> dict[str, Any]:
    """One pass over the tensors of ``path`` (sorted by name, one in memory at a time): fingerprint and/or zero counts."""
    from safetensors import SafetensorError, safe_open

    from cl_tool.safetensors_io import fingerprint_hasher, fingerprint_update

    h = fingerprint_hasher() if fingerprint else None
    counts: dict[str, dict[str, Any]] = {}
    problem = None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in sorted(names):
                t = f.get_tensor(name)
                if h is not None:
                    fingerprint_update(h, name, t)
                if name in zeros:
                    n = int(t.numel())
                    z = n - int(t.count_nonzero())
                    counts[name] = {"numel": n, "zeros": z, "fraction": z / n if n else 0.0}
                if check is not None and problem is None:
                    problem = check(name, t)
                del t
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(
            f"{path} could not be read as safetensors ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); regenerate it."
        ) from exc
    return {"fingerprint": h.hexdigest() if h is not None else None, "zeros": counts, "problem": problem}


def _finite_check(what: str):
    """A ``_scan`` check: the message every reader gives for a floating-point tensor holding NaN or ±Inf."""

    def check(name, t):
        import torch

        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return f"{what} has NaN or infinite values in {name!r}; it comes from a diverged run: use an earlier checkpoint."
        return None

    return check


def _sparsity_record(counts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    numel = sum(c["numel"] for c in counts.values())
    zeros = sum(c["zeros"] for c in counts.values())
    return {"tensors": counts, "numel": numel, "zeros": zeros, "fraction": zeros / numel if numel else 0.0}


# ----------------------------------------------------------------- one description per kind


def _describe_checkpoint(p: Path, header, meta, args: InfoArgs, info: dict[str, Any]) -> None:
    where = str(p)
    spec = spec_from_metadata(meta, where)
    history = metadata_json(meta, "cl_tool.history", where, [], (list,))
    extra = metadata_json(meta, "cl_tool.extra", where, {}, (dict,))
    layout = layout_from_metadata(meta, where)
    info["format"] = meta.get("cl_tool.format")
    info["model"] = spec.to_dict()
    if layout is not None:
        problem = layout_problem(layout, spec, header, where)
        if problem:
            info["problems"].append(problem)
        params = [n for n in layout["parameters"] if n in header]
        info["parameters"] = {
            "trainable": sum(_numel(header[n]["shape"]) for n in params),
            "tensors": len(params),
            "classifier": list(layout["classifier"]),
        }
    else:
        params = [n for n, e in header.items() if e["dtype"] in _FLOAT_CODES]
        info["parameters"] = None  # not recorded (older file): only the tensors are known
    recorded = meta.get("cl_tool.fingerprint")
    info["fingerprint"] = {"recorded": recorded, "computed": None, "verified": None}
    _history_record(history, info)
    info["extra"] = extra
    pruning = extra.get("pruning") if isinstance(extra.get("pruning"), dict) else None
    info["pruning"] = (
        {k: pruning.get(k) for k in ("by", "scope", "requested_sparsity", "achieved_sparsity", "source")}
        if pruning
        else None
    )
    if args.verify or args.sparsity:
        scan = _scan(
            p,
            list(header) if args.verify else params,
            fingerprint=args.verify,
            zeros=set(params) if args.sparsity else set(),
            check=_finite_check(f"Checkpoint {where}") if args.verify else None,
        )
        if args.verify:
            if scan["problem"]:
                info["problems"].append(scan["problem"])
            info["fingerprint"]["computed"] = scan["fingerprint"]
            info["fingerprint"]["verified"] = scan["fingerprint"] == recorded and not scan["problem"]
            if recorded is None:
                info["problems"].append(
                    f"Checkpoint {where} records no fingerprint; it was not written completely by cl-tool."
                )
            elif scan["fingerprint"] != recorded:
                info["problems"].append(
                    f"Checkpoint {where}'s tensors do not match its recorded fingerprint (recorded {recorded}, computed {scan['fingerprint']}); "
                    f"the file was changed after cl-tool wrote it."
                )
        if args.sparsity:
            info["sparsity"] = _sparsity_record(scan["zeros"])


def _describe_timm(folder: Path, args: InfoArgs) -> dict[str, Any]:
    from cl_tool.checkpoint import timm_folder_spec
    from cl_tool.safetensors_io import read_header

    spec, weights = timm_folder_spec(folder)
    header, _ = read_header(weights, "Checkpoint")
    info: dict[str, Any] = {
        "path": str(folder),
        "kind": "timm-folder",
        "file_bytes": weights.stat().st_size,
        "weights": str(weights),
        "tensors": tensor_summary(header),
        "problems": [],
        "model": spec.to_dict(),
        "parameters": None,
        "fingerprint": {"recorded": None, "computed": None, "verified": None},
        "history": [],
        "history_entries": 0,
        "history_dropped": 0,
        "lineage": [],
        "pruning": None,
    }
    if args.verify or args.sparsity:
        floats = {n for n, e in header.items() if e["dtype"] in _FLOAT_CODES}
        scan = _scan(
            weights,
            list(header) if args.verify else list(floats),
            fingerprint=args.verify,
            zeros=floats if args.sparsity else set(),
            check=_finite_check(f"Checkpoint {weights}") if args.verify else None,
        )
        info["fingerprint"]["computed"] = scan["fingerprint"]
        if scan["problem"]:
            info["problems"].append(scan["problem"])
        if args.sparsity:
            info["sparsity"] = _sparsity_record(scan["zeros"])
    return info


def _describe_sidecar(p: Path, header, meta, args: InfoArgs, info: dict[str, Any]) -> None:
    where = f"Importance file {p}"
    for key in ("method", "fingerprint"):
        if key not in meta:
            raise BadInputError(f"{where} lacks the metadata key {key!r}; recompute it with `cl-tool importance`.")
    options = metadata_json(meta, "options", where, {}, (dict,))
    data = metadata_json(meta, "data", where, None, (dict, type(None)))
    tasks = metadata_json(meta, "tasks", where, [], (list,))
    if not all(isinstance(t, dict) for t in tasks):
        raise BadInputError(
            f"{where} has malformed metadata 'tasks' (entries must be objects); recompute it with `cl-tool importance`."
        )
    try:
        decay = float(meta.get("decay", "1.0"))
    except ValueError as exc:
        raise BadInputError(
            f"{where} has malformed metadata 'decay' ({meta['decay'][:50]!r}); recompute it with `cl-tool importance`."
        ) from exc
    last = tasks[-1] if tasks else {}
    owner = (
        last.get("checkpoint")
        if last.get("fingerprint") == meta["fingerprint"] and isinstance(last.get("checkpoint"), str)
        else None
    )
    info.update(
        {
            "method": meta["method"],
            "options": options,
            "data": data,
            "samples": data.get("samples") if isinstance(data, dict) else None,
            "tasks": [
                {
                    "method": t.get("method"),
                    "data": (t.get("data") or {}).get("name") if isinstance(t.get("data"), dict) else t.get("data"),
                    "samples": (t.get("data") or {}).get("samples") if isinstance(t.get("data"), dict) else None,
                    "checkpoint": t.get("checkpoint"),
                    "fingerprint": t.get("fingerprint"),
                }
                for t in tasks
            ],
            "decay": decay,
            "belongs_to": {"fingerprint": meta["fingerprint"], "checkpoint": owner},
            "values_checked": None,
        }
    )
    if args.verify:
        import torch

        def check(name, t):
            if not torch.isfinite(t).all():
                return f"Importance of {name!r} in {p} contains NaN or Inf; recompute it instead of using it."
            if (t < 0).any():
                return f"Importance of {name!r} in {p} has negative values; recompute it."
            return None

        scan = _scan(p, list(header), fingerprint=False, zeros=set(), check=check)
        info["values_checked"] = scan["problem"] is None
        if scan["problem"]:
            info["problems"].append(scan["problem"])


def _describe_mask(p: Path, header, meta, args: InfoArgs, info: dict[str, Any]) -> None:
    try:
        requested = float(meta["sparsity"]) if meta.get("sparsity") not in (None, "None") else None
    except ValueError:
        requested = None
    info.update(
        {
            "by": meta.get("by"),
            "scope": meta.get("scope"),
            "requested_sparsity": requested,
            "pruned_from": {"fingerprint": meta.get("fingerprint")},
            "values_checked": None,
        }
    )
    if args.sparsity or args.verify:
        from cl_tool.masks import mask_value_problem

        def check(name, t):
            return mask_value_problem(f"Mask {p}", name, t)

        scan = _scan(
            p,
            list(header),
            fingerprint=False,
            zeros=set(header) if args.sparsity else set(),
            check=check if args.verify else None,
        )
        if args.sparsity:
            info["sparsity"] = _sparsity_record(scan["zeros"])  # zeros in a mask = pruned weights
        if args.verify:
            info["values_checked"] = scan["problem"] is None
            if scan["problem"]:
                info["problems"].append(scan["problem"])


def _describe_resume(p: Path, header, meta, args: InfoArgs, info: dict[str, Any]) -> None:
    where = f"Resume state {p}"
    config = metadata_json(meta, "config", where, {}, (dict,))
    position = metadata_json(meta, "position", where, {}, (dict,))
    epochs = metadata_json(meta, "epochs", where, [], (list,))
    groups: dict[str, int] = {}
    for name in header:
        prefix = name.split("/", 1)[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    data = config.get("data")
    info.update(
        {
            "input_fingerprint": meta.get("fingerprint"),
            "position": position,
            "epochs_done": len(epochs),
            "config": config,
            "data": data.get("name") if isinstance(data, dict) else data,
            "tensor_groups": groups,
        }
    )


def describe(path: Path, args: InfoArgs) -> dict[str, Any]:
    """One file's description (a dict, JSON-ready); raises BadInputError for a damaged or foreign file."""
    from cl_tool.safetensors_io import read_header

    p = Path(path)
    if p.is_dir():
        return _describe_timm(p, args)
    header, meta = read_header(p, "File")
    info: dict[str, Any] = {
        "path": str(p),
        "kind": None,
        "file_bytes": p.stat().st_size,
        "tensors": tensor_summary(header),
        "problems": [],
    }
    if "cl_tool.model" in meta:
        info["kind"] = "checkpoint"
        _describe_checkpoint(p, header, meta, args, info)
    elif meta.get("cl_tool.sidecar"):
        info["kind"] = "sidecar"
        _describe_sidecar(p, header, meta, args, info)
    elif meta.get("cl_tool.mask"):
        info["kind"] = "mask"
        _describe_mask(p, header, meta, args, info)
    elif meta.get("cl_tool.resume"):
        info["kind"] = "resume"
        _describe_resume(p, header, meta, args, info)
    else:
        raise _not_cl_tool(p)
    return info


# ----------------------------------------------------------------- --for CKPT


def _target(path: Path, verify: bool) -> dict[str, Any]:
    """What --for needs of a checkpoint: fingerprint, history, parameter shapes."""
    from cl_tool.safetensors_io import read_header

    p = Path(path)
    if p.is_dir():
        from cl_tool.checkpoint import timm_folder_spec

        _, weights = timm_folder_spec(p)
        header, _ = read_header(weights, "Checkpoint")
        fp = _scan(weights, list(header), fingerprint=True, zeros=set())["fingerprint"]
        return {
            "path": str(p),
            "fingerprint": fp,
            "fingerprint_from": "computed",
            "history": [{"command": "import", "from": str(p)}],
            "params": None,
            "shapes": {n: list(e["shape"]) for n, e in header.items()},
        }
    header, meta = read_header(p, "--for checkpoint")
    if "cl_tool.model" not in meta:
        raise BadInputError(
            f"--for {p} is not a cl-tool checkpoint; give the checkpoint (or timm folder) that would use the file."
        )
    history = metadata_json(meta, "cl_tool.history", str(p), [], (list,))
    layout = layout_from_metadata(meta, str(p))
    fp, source = meta.get("cl_tool.fingerprint"), "recorded"
    if verify or not fp:
        fp, source = _scan(p, list(header), fingerprint=True, zeros=set())["fingerprint"], "computed"
    return {
        "path": str(p),
        "fingerprint": fp,
        "fingerprint_from": source,
        "history": history,
        "params": list(layout["parameters"]) if layout else None,
        "shapes": {n: list(e["shape"]) for n, e in header.items()},
    }


def _relation(info: dict[str, Any], t: dict[str, Any], header_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Whether checkpoint ``t`` may use the sidecar / mask / resume state ``info``, and why."""
    from cl_tool.lineage import ancestor_fingerprints, generations_back, generations_text, grown_since, not_related_text

    ck = t["path"]
    fp_note = (
        ""
        if t["fingerprint_from"] == "computed"
        else f"; judged by the fingerprint {ck} records (--verify recomputes it)"
    )
    if info["kind"] == "resume":
        same = info["input_fingerprint"] == t["fingerprint"]
        return {
            "checkpoint": ck,
            "usable": same,
            "generations": 0 if same else None,
            "reason": (
                f"yes: it was written by a train-next run from {ck}; rerun the same command with --resume{fp_note}"
                if same
                else f"no: it was written by a train-next run from another checkpoint (fingerprint {info['input_fingerprint']}, {ck} has {t['fingerprint']}); "
                f"train-next --resume refuses it (exit 4){fp_note}"
            ),
        }
    fp = info["belongs_to"]["fingerprint"] if info["kind"] == "sidecar" else info["pruned_from"]["fingerprint"]
    gen = generations_back(fp, t["fingerprint"], t["history"])
    n_anc = len(ancestor_fingerprints(t["history"]))
    names = t["params"] if (t["params"] is not None and info["kind"] == "sidecar") else list(header_shapes)
    grown = grown_since(t["history"], gen) if gen else frozenset()

    def layout_problem() -> str | None:
        if info["kind"] == "sidecar":
            missing = [n for n in names if n not in header_shapes]
            if missing:
                return f"it has no entry for {missing[0]!r} of {ck}"
        for n in names:
            if n not in t["shapes"]:
                return f"{ck} has no parameter {n!r}"
            want, got = t["shapes"][n], header_shapes.get(n)
            if got is not None and got != want and not (n in grown and got[1:] == want[1:] and got[:1] < want[:1]):
                return f"{n!r} has shape {got} there but {want} in {ck}"
        return None

    if info["kind"] == "mask":
        problem = layout_problem()
        where = (
            f"{ck} itself"
            if gen == 0
            else f"an ancestor of {ck} {generations_text(gen)}"
            if gen
            else f"another checkpoint (fingerprint {fp}), {not_related_text(ck, t['fingerprint'], n_anc)}"
        )
        if problem:
            return {
                "checkpoint": ck,
                "usable": False,
                "generations": gen,
                "reason": f"no: {problem}; train-next --mask refuses it (exit 4)",
            }
        return {
            "checkpoint": ck,
            "usable": True,
            "generations": gen,
            "reason": f"yes: names and shapes fit train-next --mask; it was computed by pruning {where}"
            + ("" if gen is not None else ", so check that it is the mask you mean")
            + fp_note,
        }
    if gen is None:
        return {
            "checkpoint": ck,
            "usable": False,
            "generations": None,
            "reason": f"no: it belongs to another checkpoint (fingerprint {fp}), {not_related_text(ck, t['fingerprint'], n_anc)}; "
            f"prune and train-next refuse it (exit 4){fp_note}",
        }
    problem = layout_problem()
    if problem:
        return {
            "checkpoint": ck,
            "usable": False,
            "generations": gen,
            "reason": f"no: it belongs to {'it' if gen == 0 else 'its ancestor ' + generations_text(gen)}, but {problem}; recompute it with `cl-tool importance {ck}`",
        }
    if gen == 0:
        return {
            "checkpoint": ck,
            "usable": True,
            "generations": 0,
            "reason": f"yes: it was computed for {ck} itself (the fingerprints match){fp_note}",
        }
    return {
        "checkpoint": ck,
        "usable": True,
        "generations": gen,
        "reason": f"yes: it was computed for an ancestor of {ck} {generations_text(gen)}, per the history {ck} records"
        + (f"; the rows --grow-head added since ({', '.join(sorted(grown))}) score 0" if grown else "")
        + fp_note,
    }


# ----------------------------------------------------------------- output


def _print(info: dict[str, Any], out: Output) -> None:
    t = info["tensors"]
    out.say(f"{info['path']}: {KINDS[info['kind']]}, {human_bytes(info['file_bytes'])}")
    dtypes = ", ".join(f"{d} {v['values']:,} values ({human_bytes(v['bytes'])})" for d, v in t["by_dtype"].items())
    if info["kind"] in ("checkpoint", "timm-folder"):
        m = info["model"]
        kwargs = " ".join(f"{k}={v}" for k, v in m["kwargs"].items())
        out.say(
            f"  model: {m['arch']}{(' ' + kwargs) if kwargs else ''} ({m['source']}); input {'x'.join(map(str, m['input_shape']))}, "
            f"{m['num_classes']} classes; mean {m['mean']}, std {m['std']}"
        )
        dc = m.get("data_config")
        if isinstance(dc, dict):
            out.say(f"  timm data config: {data_config_text(dc)}")
            note = small_input_note(m["input_shape"], dc)
            if note:
                out.say(f"  note: {note}")
        names = m.get("class_names")
        if names is not None:
            named = [f"{i}={n}" for i, n in enumerate(names) if n is not None]
            shown = ", ".join(named[:20]) + (f", … {len(named) - 20} more" if len(named) > 20 else "")
            free = sum(n is None for n in names)
            out.say(f"  class names (output row=name): {shown or '-'}{f'; {free} rows unnamed' if free else ''}")
        else:
            out.say("  class names: not recorded (labels are matched to output rows by position)")
        prm = info.get("parameters")
        if prm:
            out.say(
                f"  parameters: {prm['trainable']:,} trainable in {prm['tensors']} tensors (classifier: {', '.join(prm['classifier']) or '-'})"
            )
        out.say(f"  stored: {t['count']} tensors, {t['values']:,} values: {dtypes or '-'}")
        fp = info["fingerprint"]
        if info["kind"] == "timm-folder":
            out.say(
                f"  fingerprint: {fp['computed']} (computed)"
                if fp["computed"]
                else "  fingerprint: not recorded in a timm folder (--verify computes it)"
            )
        elif fp["verified"] is None:
            out.say(f"  fingerprint: {fp['recorded']} (recorded; --verify checks it against the tensors)")
        else:
            out.say(
                f"  fingerprint: {fp['recorded']} ({'verified: matches the tensors' if fp['verified'] else 'MISMATCH: the tensors give ' + str(fp['computed'])})"
            )
        if info.get("pruning"):
            pr = info["pruning"]
            src = pr.get("source") or {}
            out.say(
                f"  pruned (recorded): {pr.get('achieved_sparsity', 0) or 0:.4%} of the selected weights by {pr.get('by')} ({pr.get('scope')})"
                + (
                    f", scores from {src['sidecar']}"
                    + (f" ({generations_text_safe(src.get('generations'))})" if src.get("generations") else "")
                    if src.get("sidecar")
                    else ""
                )
            )
        if info.get("history"):
            out.table(
                "  history (oldest first)",
                ["command", "data", "penalty", "λ", "time", "detail"],
                [
                    [
                        r["command"],
                        r["data"] or "",
                        r["penalty"] or "",
                        ""
                        if r["lambda"] is None
                        else f"{r['lambda']:g}"
                        if isinstance(r["lambda"], (int, float))
                        else str(r["lambda"]),
                        _short_time(r["time"]),
                        r["detail"] or "",
                    ]
                    for r in info["history"][-SHOWN_ROWS:]
                ],
            )
            hidden = info.get("history_entries", len(info["history"])) - min(SHOWN_ROWS, len(info["history"]))
            dropped = info.get("history_dropped", 0)
            if hidden or dropped:
                out.log(
                    f"  … {hidden:,} older entries not shown (--json lists the newest {HISTORY_LIMIT})"
                    + (f"; {dropped:,} older still were dropped by earlier commands" if dropped else "")
                )
        lin = [r for r in info.get("lineage", []) if r["fingerprint"]]
        if lin:
            out.table(
                "  lineage (recorded ancestors, newest first)",
                ["generations back", "fingerprint", "read by"],
                [[r["generations"], r["fingerprint"], r["read_by"]] for r in lin[:SHOWN_ROWS]],
            )
            if len(lin) > SHOWN_ROWS:
                out.log(f"  … {len(lin) - SHOWN_ROWS:,} older ancestors (--json lists them)")
        elif info["kind"] == "checkpoint":
            out.say("  lineage: no recorded ancestors")
    elif info["kind"] == "sidecar":
        opts = " ".join(f"{k}={v}" for k, v in info["options"].items())
        data = info["data"] or {}
        out.say(
            f"  method: {info['method']}{(' (' + opts + ')') if opts else ''}; data: "
            + (
                f"{data.get('name')} ({data.get('source')}, split {data.get('split')}, {info['samples']} samples)"
                if data
                else "none"
            )
        )
        out.say(
            f"  tasks accumulated: {len(info['tasks'])} ({', '.join(str(x['data'] or x['method']) for x in info['tasks'])}); decay {info['decay']:g}"
        )
        b = info["belongs_to"]
        out.say(f"  belongs to: {b['checkpoint'] + ' ' if b['checkpoint'] else ''}(fingerprint {b['fingerprint']})")
        out.say(f"  stored: {t['count']} tensors, {t['values']:,} values: {dtypes or '-'}")
        if info["values_checked"] is not None:
            out.say(f"  values: {'finite and non-negative' if info['values_checked'] else 'INVALID'}")
    elif info["kind"] == "mask":
        out.say(
            f"  pruned by {info['by']} ({info['scope']}), requested sparsity {info['requested_sparsity']}; from the checkpoint with fingerprint {info['pruned_from']['fingerprint']}"
        )
        out.say(f"  stored: {t['count']} mask tensor(s), {t['values']:,} values: {dtypes or '-'}")
    elif info["kind"] == "resume":
        pos, cfg = info["position"], info["config"]
        out.say(
            f"  position: epoch {pos.get('epoch')}, batch {pos.get('batch')}, step {pos.get('global_step')}; {info['epochs_done']} epoch(s) done"
        )
        out.say(
            f"  run: data {info['data']}, penalty {cfg.get('penalty')}, λ {cfg.get('lambda')}, {cfg.get('optimizer')} lr {cfg.get('lr')}, "
            f"{cfg.get('epochs')} epoch(s), batch {cfg.get('batch_size')}, seed {cfg.get('seed')}"
        )
        out.say(f"  training from the checkpoint with fingerprint {info['input_fingerprint']}")
        out.say(
            f"  stored: {t['count']} tensors ({', '.join(f'{k} {v}' for k, v in info['tensor_groups'].items())}), {human_bytes(t['bytes'])}"
        )
    sp = info.get("sparsity")
    if sp is not None:
        what = "pruned (mask zeros)" if info["kind"] == "mask" else "zero weights"
        rows = [[n, c["numel"], c["zeros"], c["fraction"]] for n, c in sp["tensors"].items() if c["zeros"]]
        if rows:
            out.table(
                f"  sparsity: {sp['zeros']:,} of {sp['numel']:,} {what} ({sp['fraction']:.4%})",
                ["tensor", "numel", "zeros", "sparsity"],
                rows,
            )
        else:
            out.say(f"  sparsity: no {what} among {sp['numel']:,} values")
    rel = info.get("for")
    if rel is not None:
        out.say(f"  for {rel['checkpoint']}: {rel['reason']}.")


def data_config_text(dc: dict[str, Any]) -> str:
    """``resize bicubic, centre crop_pct 0.95; mean (…), std (…)`` from a recorded timm data config."""
    size = dc.get("input_size")
    return (
        f"input {'x'.join(map(str, size)) if isinstance(size, list) else size}, interpolation {dc.get('interpolation')}, "
        f"crop_pct {dc.get('crop_pct')} ({dc.get('crop_mode')}), mean {dc.get('mean')}, std {dc.get('std')}"
    )


def small_input_note(input_shape: list[int], dc: dict[str, Any]) -> str | None:
    """A note when photo-scale preprocessing meets a small input (≤ 64 px): a centre crop cuts a digit's edges."""
    from cl_tool.data.transforms import SMALL_INPUT

    crop = dc.get("crop_pct")
    if min(int(v) for v in input_shape[1:]) > SMALL_INPUT or not isinstance(crop, (int, float)) or crop >= 1:
        return None
    return (
        f"images are resized to {1 / crop:.3g}x the input and centre-cropped (crop_pct {crop:g}), a photo default that "
        f"cuts the edges of a {input_shape[1]}x{input_shape[2]} image; `cl-tool init` records crop_pct 1.0 for inputs "
        f"of at most {SMALL_INPUT} px"
    )


def generations_text_safe(n: Any) -> str:
    from cl_tool.lineage import generations_text

    return generations_text(n) if isinstance(n, int) else str(n)


def run_info(args: InfoArgs, out: Output) -> list[dict[str, Any]]:
    from cl_tool.safetensors_io import read_header

    if not args.paths:
        raise UsageError("info needs at least one PATH.")
    infos = [describe(p, args) for p in args.paths]
    if args.for_checkpoint is not None:
        usable = [i for i in infos if i["kind"] in ("sidecar", "mask", "resume")]
        if not usable:
            raise UsageError(
                "$for_checkpoint CKPT says whether CKPT may use an importance sidecar, mask or resume state, and none of the PATHs is one; drop $for_checkpoint or add such a file."
            )
        target = _target(args.for_checkpoint, args.verify)
        for i in usable:
            header, _ = read_header(i["path"], "File")
            i["for"] = _relation(i, target, {n: list(e["shape"]) for n, e in header.items()})
    problems = [p for i in infos for p in i["problems"]]
    if out.json and not problems:
        out.result(infos)
    elif not out.json:
        for i in infos:
            _print(i, out)
    for p in problems[1:]:
        out.warn(p)
    if problems:
        error = BadInputError(problems[0])
        error.result = {"files": infos}  # --json: the descriptions beside the error
        raise error
    return infos


__all__ = ["InfoArgs", "run_info", "describe"]
