"""What ``cl-tool info`` does: describe the files cl-tool reads and writes, from their headers.

Kinds: a checkpoint (``cl_tool.model`` metadata), an importance sidecar (``cl_tool.sidecar``), a
mask (``cl_tool.mask``, from ``prune --mask-out``), a resumable training state (``cl_tool.resume``)
and a timm folder (``config.json`` + ``model.safetensors``). Each format module reads its own kind
(``describe``) and judges ``--for`` (``relation``); this module picks the kind and prints. Only the
safetensors header is read (tensor names, dtypes, shapes, metadata), so this is fast on large files
and imports no torch; ``--verify`` and ``--sparsity`` read the tensors, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool import checkpoint, masks, resume, sidecar
from cl_tool.checkpoint import HISTORY_LIMIT, describe_timm_folder, lineage_target
from cl_tool.errors import BadInputError, UsageError
from cl_tool.lineage import generations_text
from cl_tool.output import Output, human_bytes
from cl_tool.params import Args, argument, config_option, option
from cl_tool.safetensors_io import read_header, tensor_summary

SHOWN_ROWS = 20  # history entries and ancestors printed (--json: HISTORY_LIMIT entries, LINEAGE_LIMIT ancestors)


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


# ----------------------------------------------------------------- the printers, one per kind


def _dtypes(info: dict[str, Any]) -> str:
    by_dtype = info["tensors"]["by_dtype"]
    return ", ".join(f"{d} {v['values']:,} values ({human_bytes(v['bytes'])})" for d, v in by_dtype.items()) or "-"


def _print_model(info: dict[str, Any], out: Output) -> None:
    """Model, class names, parameters, stored tensors and fingerprint of a checkpoint or timm folder."""
    m, t = info["model"], info["tensors"]
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
    out.say(f"  stored: {t['count']} tensors, {t['values']:,} values: {_dtypes(info)}")
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


def _print_pruning(pr: dict[str, Any], out: Output) -> None:
    src = pr.get("source") or {}
    gen = src.get("generations")
    gen_text = generations_text(gen) if isinstance(gen, int) else str(gen)
    out.say(
        f"  pruned (recorded): {pr.get('achieved_sparsity', 0) or 0:.4%} of the selected weights by {pr.get('by')} ({pr.get('scope')})"
        + ((f", scores from {src['sidecar']}" + (f" ({gen_text})" if gen else "")) if src.get("sidecar") else "")
    )


def _lambda_text(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _print_history(info: dict[str, Any], out: Output) -> None:
    """The history table (newest SHOWN_ROWS entries) and the lineage table of a checkpoint or timm folder."""
    if info.get("history"):
        out.table(
            "  history (oldest first)",
            ["command", "data", "penalty", "λ", "time", "detail"],
            [
                [
                    r["command"],
                    r["data"] or "",
                    r["penalty"] or "",
                    _lambda_text(r["lambda"]),
                    r["time"][:16].replace("T", " ") if isinstance(r["time"], str) else "",
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


def _print_checkpoint(info: dict[str, Any], out: Output) -> None:
    _print_model(info, out)
    if info.get("pruning"):
        _print_pruning(info["pruning"], out)
    _print_history(info, out)


def _print_sidecar(info: dict[str, Any], out: Output) -> None:
    t = info["tensors"]
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
    out.say(f"  stored: {t['count']} tensors, {t['values']:,} values: {_dtypes(info)}")
    if info["values_checked"] is not None:
        out.say(f"  values: {'finite and non-negative' if info['values_checked'] else 'INVALID'}")


def _print_mask(info: dict[str, Any], out: Output) -> None:
    t = info["tensors"]
    out.say(
        f"  pruned by {info['by']} ({info['scope']}), requested sparsity {info['requested_sparsity']}; from the checkpoint with fingerprint {info['pruned_from']['fingerprint']}"
    )
    out.say(f"  stored: {t['count']} mask tensor(s), {t['values']:,} values: {_dtypes(info)}")


def _print_resume(info: dict[str, Any], out: Output) -> None:
    t, pos, cfg = info["tensors"], info["position"], info["config"]
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


def _print_sparsity(info: dict[str, Any], out: Output) -> None:
    sp = info["sparsity"]
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


# ----------------------------------------------------------------- the table of kinds


@dataclass(frozen=True)
class Kind:
    """One kind of file: its name in the output, the metadata key that marks it, who reads it, who judges --for."""

    label: str
    marker: str | None  # None: a folder
    describe: Callable[..., dict[str, Any]] | None
    relation: Callable[..., dict[str, Any]] | None
    show: Callable[[dict[str, Any], Output], None]


KINDS = {
    "checkpoint": Kind("cl-tool checkpoint", "cl_tool.model", checkpoint.describe, None, _print_checkpoint),
    "timm-folder": Kind("timm model folder", None, None, None, _print_checkpoint),
    "sidecar": Kind("importance sidecar", "cl_tool.sidecar", sidecar.describe, sidecar.relation, _print_sidecar),
    "mask": Kind("pruning mask", "cl_tool.mask", masks.describe, masks.relation, _print_mask),
    "resume": Kind("resumable training state", "cl_tool.resume", resume.describe, resume.relation, _print_resume),
}


def _kind_of(meta: dict[str, str]) -> str | None:
    """The kind whose marker the metadata holds (a checkpoint's by presence, the others' by a non-empty value)."""
    if "cl_tool.model" in meta:
        return "checkpoint"
    return next((k for k, kind in KINDS.items() if kind.marker and meta.get(kind.marker)), None)


def _not_cl_tool(p: Path) -> BadInputError:
    hint = ""
    if p.name == "model.safetensors" and (p.parent / "config.json").is_file():
        hint = f" (for a timm folder give the folder {p.parent})"
    return BadInputError(
        f"{p} is a safetensors file without cl-tool metadata{hint}; `cl-tool info` describes checkpoints, importance sidecars, "
        f"masks and resume states written by cl-tool, and timm folders (config.json + model.safetensors)."
    )


def describe(path: Path, args: InfoArgs) -> dict[str, Any]:
    """One file's description (a dict, JSON-ready); raises BadInputError for a damaged or foreign file."""
    p = Path(path)
    if p.is_dir():
        return describe_timm_folder(p, verify=args.verify, sparsity=args.sparsity)
    header, meta = read_header(p, "File")
    kind = _kind_of(meta)
    if kind is None:
        raise _not_cl_tool(p)
    info: dict[str, Any] = {
        "path": str(p),
        "kind": kind,
        "file_bytes": p.stat().st_size,
        "tensors": tensor_summary(header),
        "problems": [],
    }
    fields = KINDS[kind].describe(
        p, header, meta, problems=info["problems"], verify=args.verify, sparsity=args.sparsity
    )
    info.update(fields)
    return info


def _print(info: dict[str, Any], out: Output) -> None:
    out.say(f"{info['path']}: {KINDS[info['kind']].label}, {human_bytes(info['file_bytes'])}")
    KINDS[info["kind"]].show(info, out)
    if info.get("sparsity") is not None:
        _print_sparsity(info, out)
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
    from cl_tool.data.transforms import SMALL_INPUT  # not at the top: the data package is slow to import

    crop = dc.get("crop_pct")
    if min(int(v) for v in input_shape[1:]) > SMALL_INPUT or not isinstance(crop, (int, float)) or crop >= 1:
        return None
    return (
        f"images are resized to {1 / crop:.3g}x the input and centre-cropped (crop_pct {crop:g}), a photo default that "
        f"cuts the edges of a {input_shape[1]}x{input_shape[2]} image; `cl-tool init` records crop_pct 1.0 for inputs "
        f"of at most {SMALL_INPUT} px"
    )


def run_info(args: InfoArgs, out: Output) -> list[dict[str, Any]]:
    if not args.paths:
        raise UsageError("info needs at least one PATH.")
    infos = [describe(p, args) for p in args.paths]
    if args.for_checkpoint is not None:
        usable = [i for i in infos if KINDS[i["kind"]].relation is not None]
        if not usable:
            raise UsageError(
                "$for_checkpoint CKPT says whether CKPT may use an importance sidecar, mask or resume state, and none of the PATHs is one; drop $for_checkpoint or add such a file."
            )
        target = lineage_target(Path(args.for_checkpoint), args.verify)
        for i in usable:
            header, _ = read_header(i["path"], "File")
            i["for"] = KINDS[i["kind"]].relation(i, target, {n: list(e["shape"]) for n, e in header.items()})
    for i in infos:  # a format module's sentence may name an option as $name
        i["problems"] = [out.text(p) for p in i["problems"]]
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
