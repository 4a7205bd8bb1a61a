"""What ``cl-tool prune`` does, separated from option parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.output import emit_json, log, print_table

SCORES = ("magnitude", "importance", "signal", "fisher", "mas", "si")
SCOPES = ("global", "layer")


@dataclass
class PruneArgs:
    checkpoint: Path
    by: list[str] = field(default_factory=lambda: ["importance"])
    sparsity: Optional[float] = None
    scope: str = "global"
    output: Optional[Path] = None
    mask_out: Optional[Path] = None
    importance: Optional[Path] = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    include_bias: bool = False
    include_norm: bool = False
    include_classifier: bool = False
    sweep: Optional[str] = None
    data: list[str] = field(default_factory=list)
    score_data: list[str] = field(default_factory=list)
    plot: Optional[Path] = None
    batch_size: int = 256
    device: str = "auto"
    split: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    permute: Optional[int] = None
    rotate: Optional[float] = None
    invert: bool = False
    limit: Optional[int] = None
    force: bool = False
    json_out: bool = False
    config: Optional[Path] = None


def _check_sparsity(s: float, option: str = "--sparsity") -> float:
    if not (0.0 <= s < 1.0):
        raise UsageError(f"{option} must be in [0, 1), got {s}.")
    return s


def _parse_sweep(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--sweep {text!r} must be comma-separated numbers in [0, 1), e.g. 0.5,0.9,0.99.") from exc
    if not vals:
        raise UsageError("--sweep needs at least one sparsity.")
    return [_check_sparsity(v, "--sweep values") for v in vals]


def _validate(a: PruneArgs) -> None:
    for b in a.by:
        if b not in SCORES:
            raise UsageError(f"--by {b} is unknown; use one of {', '.join(SCORES)}.")
    if a.scope not in SCOPES:
        raise UsageError(f"--scope {a.scope} is unknown; use global or layer.")
    if a.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {a.batch_size}.")
    if a.sweep is not None:
        if a.output is not None or a.mask_out is not None:
            raise UsageError("--sweep evaluates without writing checkpoints; drop --output/--mask-out or drop --sweep.")
        if a.sparsity is not None:
            raise UsageError("--sweep and --sparsity contradict each other; use one.")
        if len(a.data) != 1:
            raise UsageError("--sweep needs exactly one --data to evaluate on.")
        _parse_sweep(a.sweep)
    else:
        if a.sparsity is None:
            raise UsageError("prune needs --sparsity (or --sweep).")
        _check_sparsity(a.sparsity)
        if a.output is None and a.mask_out is None:
            raise UsageError("prune needs --output (and/or --mask-out) to write the result.")
        if len(a.by) != 1:
            raise UsageError("Several --by values only make sense with --sweep; give one score.")
        if a.plot is not None:
            raise UsageError("--plot needs --sweep.")


def compute_scores(a: PruneArgs, by: str, ckpt, get_model, named: dict[str, Any], device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores for every named parameter, and a record of where they came from.

    ``get_model()`` returns the materialised model; it is only called for scores computed on data.
    """
    from cl_tool.cli._common import data_specs
    from cl_tool.importance import compute_importance
    from cl_tool.lineage import check_sidecar, fit_rows
    from cl_tool.sidecar import default_sidecar_path, load_sidecar
    from cl_tool.workflows.common import load_tasks
    from cl_tool.workflows.importance import batches_of

    if by == "magnitude":
        return {n: p.detach().abs().float().cpu() for n, p in named.items()}, {"by": "magnitude"}
    path = a.importance or default_sidecar_path(a.checkpoint)
    if path.exists():
        sc = load_sidecar(path)
        if by != "importance" and sc.method != by:
            if a.importance is not None:
                raise UsageError(f"--by {by} but --importance {path} holds {sc.method} importances; pass a {by} sidecar or --by importance.")
        else:
            use = check_sidecar(sc, ckpt, str(a.checkpoint))  # the checkpoint's own, or a recorded ancestor's (exit 4 otherwise)
            if use.note:
                log(use.note)
            missing = [n for n in named if n not in sc.tensors]
            if missing:
                raise BadInputError(f"Importance file {path} has no entry for {missing[0]!r}; recompute it for {a.checkpoint}.")
            scores = fit_rows(sc.tensors, named, use.grown)  # rows added by --grow-head since then score 0
            bad = next((n for n in named if tuple(scores[n].shape) != tuple(named[n].shape)), None)
            if bad is not None:
                raise IncompatibleError(f"Importance of {bad!r} in {path} has shape {list(scores[bad].shape)}, but {a.checkpoint} has {list(named[bad].shape)}; "
                                        f"recompute it with `cl-tool importance {a.checkpoint}`.")
            return scores, {"by": by, "method": sc.method, "tasks": len(sc.tasks), **use.record()}
    if by in ("importance", "si"):
        raise BadInputError(f"--by {by} needs an importance sidecar, and {path} does not exist; run `cl-tool importance` (or train-next --si-out) first, or pass --importance.")
    sources = a.score_data or a.data
    if len(sources) != 1:
        raise UsageError(f"--by {by} without a {by} sidecar computes the scores on data: give one --score-data (or --data).")
    spec = data_specs(sources, split=a.split, image_column=a.image_column, label_column=a.label_column, permute=a.permute,
                      rotate=a.rotate, invert=a.invert, limit=a.limit)[0]
    (task,) = load_tasks([spec], ckpt.spec, num_classes=ckpt.spec.num_classes)
    scores = compute_importance(get_model(), batches_of(task.x, task.y, a.batch_size), by, device=device)
    return {n: scores[n].cpu() for n in named}, {"by": by, "computed_on": task.describe()}


def run_prune(a: PruneArgs) -> dict[str, Any]:
    import torch

    from cl_tool.atomic import FileRoles, all_or_nothing
    from cl_tool.checkpoint import instantiate, load_checkpoint, model_layout, save_checkpoint, structure, validate_layout
    from cl_tool.cli._common import argv_text, data_specs, history_entry
    from cl_tool.pruning import apply_masks, global_masks, layer_masks, select_prunable, sparsity_report
    from cl_tool.safetensors_io import save_tensors
    from cl_tool.training import evaluate_task, resolve_device
    from cl_tool.sidecar import default_sidecar_path
    from cl_tool.workflows.common import load_tasks, register_data

    _validate(a)
    data_kw = dict(split=a.split, image_column=a.image_column, label_column=a.label_column, permute=a.permute, rotate=a.rotate,
                   invert=a.invert, limit=a.limit)
    roles = FileRoles(force=a.force)
    roles.input(a.checkpoint, "the checkpoint")
    if any(b != "magnitude" for b in a.by):
        roles.input(a.importance or default_sidecar_path(a.checkpoint),
                    "--importance" if a.importance else "the importance file beside the checkpoint")
    roles.input(a.config, "--config")
    register_data(roles, data_specs(a.data, **data_kw), "--data")
    register_data(roles, data_specs(a.score_data, **data_kw), "--score-data")
    roles.output(a.output, "--output")
    roles.output(a.mask_out, "--mask-out")
    roles.output(a.plot, "--plot")
    roles.check()
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint)
    if ckpt.layout is not None and "spec" in ckpt.layout:  # written by cl-tool: names/shapes are recorded, no rebuild needed
        validate_layout(ckpt)
        layout = ckpt.layout
    else:  # e.g. a timm folder: build the architecture on the meta device (no memory) to learn its layout
        layout = model_layout(structure(ckpt))
    live: dict[str, Any] = {}

    def get_model():
        """The real model (built once, only when data has to flow through it); shares ckpt.state's values."""
        if "model" not in live:
            live["model"] = instantiate(ckpt).to(device)
        return live["model"]

    named = {n: ckpt.state[n] for n in layout["parameters"]}
    chosen = select_prunable(named, include=a.include or None, exclude=a.exclude or None,
                             include_bias=a.include_bias, include_norm=a.include_norm, include_classifier=a.include_classifier,
                             classifier_names=tuple(layout["classifier"]))
    if not chosen:
        raise UsageError("No parameter is selected for pruning; adjust --include/--exclude or the --include-* flags.")
    make_masks = global_masks if a.scope == "global" else layer_masks

    if a.sweep is not None:
        levels = _parse_sweep(a.sweep)
        spec = data_specs(a.data, split=a.split, image_column=a.image_column, label_column=a.label_column, permute=a.permute,
                          rotate=a.rotate, invert=a.invert, limit=a.limit)[0]
        (test,) = load_tasks([spec], ckpt.spec, num_classes=ckpt.spec.num_classes)
        model = get_model()
        params = dict(model.named_parameters())
        original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        base_acc, _ = evaluate_task(model, test.x, test.y, device=device, batch_size=a.batch_size)
        curves: dict[str, list[tuple[float, float]]] = {}
        for by in a.by:
            scores, _src = compute_scores(a, by, ckpt, get_model, named, device)
            scores = {n: scores[n] for n in chosen}
            curve = []
            for s in levels:
                masks = make_masks(scores, s)
                with torch.no_grad():
                    for n, m in masks.items():
                        params[n].masked_fill_(m.to(params[n].device).logical_not(), 0)
                acc, _ = evaluate_task(model, test.x, test.y, device=device, batch_size=a.batch_size)
                curve.append((s, acc))
                model.load_state_dict(original)
            curves[by] = curve
        print_table(f"accuracy vs sparsity on {spec.name} (unpruned {base_acc:.4f})", ["sparsity"] + list(curves),
                    [[f"{s:g}"] + [curves[b][i][1] for b in curves] for i, s in enumerate(levels)])
        result = {"checkpoint": str(a.checkpoint), "data": test.describe(), "scope": a.scope, "unpruned_accuracy": base_acc,
                  "sparsities": levels, "curves": {b: [{"sparsity": s, "accuracy": acc} for s, acc in c] for b, c in curves.items()}}
        if a.plot is not None:
            from cl_tool.plots import plot_prune_curves

            plot_prune_curves(curves, a.plot, title=f"{Path(str(a.checkpoint)).name} on {spec.name}", force=a.force)
        if a.json_out:
            emit_json(result)
        return result

    by = a.by[0]
    scores, source = compute_scores(a, by, ckpt, get_model, named, device)
    masks = make_masks({n: scores[n] for n in chosen}, a.sparsity)
    del scores
    source_fp = ckpt.fingerprint
    state = {k: v.detach().cpu() for k, v in (live["model"].state_dict() if "model" in live else ckpt.state).items()}
    apply_masks(state, masks)
    report, total = sparsity_report(masks)
    print_table(f"sparsity by parameter ({by}, {a.scope})", ["parameter", "numel", "pruned", "sparsity"],
                [[n, numel, pruned, frac] for n, numel, pruned, frac in report])
    record = {"by": by, "scope": a.scope, "requested_sparsity": a.sparsity, "achieved_sparsity": total.fraction,
              "pruned": total.pruned, "selected": total.numel, "source": source,
              "per_layer": {n: frac for n, _, _, frac in report}}
    result = {"output": str(a.output) if a.output else None, "mask_out": str(a.mask_out) if a.mask_out else None, **record}
    with all_or_nothing() as wrote:
        if a.output is not None:
            extra = dict(ckpt.extra)
            extra["pruning"] = record
            hist = ckpt.history + [history_entry("prune", argv=argv_text(), by=by, scope=a.scope, sparsity=a.sparsity,
                                                 achieved=total.fraction, source_fingerprint=source_fp, importance=source.get("sidecar"),
                                                 importance_fingerprint=source.get("sidecar_fingerprint"),
                                                 importance_generations=source.get("generations"))]
            result["fingerprint"] = save_checkpoint(a.output, ckpt.spec, state, hist, extra=extra, force=a.force, layout=layout)
            wrote(a.output)
        if a.mask_out is not None:
            save_tensors(a.mask_out, {n: m.to(torch.uint8) for n, m in masks.items()},
                         {"cl_tool.mask": "1", "by": by, "scope": a.scope, "sparsity": repr(a.sparsity), "fingerprint": source_fp},
                         force=a.force)
            wrote(a.mask_out)
    log(f"Pruned {total.pruned:,} of {total.numel:,} selected weights ({total.fraction:.4%}) by {by} ({a.scope})"
        f"{f'; wrote {a.output}' if a.output else ''}{f'; masks in {a.mask_out}' if a.mask_out else ''}.")
    if a.json_out:
        emit_json(result)
    return result
