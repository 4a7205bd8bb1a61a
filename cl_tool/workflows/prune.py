"""``cl-tool prune``: zero the weights with the lowest scores, or sweep sparsities and report accuracy."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.checkpoint import trim_history
from cl_tool.data import DATA_HELP, DATA_METAVAR, DataOptions
from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.importance import BIAS_SCORES, FISHER_LABELS, MAS_OUTPUTS, METHODS_BY_NAME, SIGNAL_NORMS, SIGNAL_STATS
from cl_tool.output import Output
from cl_tool.params import Args, argument, config_option, force_option, group, option
from cl_tool.runtime import device_option
from cl_tool.training import BN_STATS

# The imports inside functions stay there for start-up time: `--help` imports no torch, and the streaming path
# (magnitude or stored scores) prunes a checkpoint file with numpy alone (tests/test_prune_stream.py checks both).

SCORES = ("magnitude", "importance", "signal", "fisher", "mas", "si")  # importance: the sidecar's method, whichever
SCOPES = ("global", "layer", "output", "lamp")
RANKS = ("auto", "raw", "saliency")  # Ω·w² for an importance Ω (auto), Ω as stored (raw), Ω·w² (saliency)
_ON_DATA = tuple(n for n, m in METHODS_BY_NAME.items() if m.needs_data)  # computed on data without a sidecar
_SALIENCY_SCORES = ("importance", *(n for n, m in METHODS_BY_NAME.items() if not m.weighs_w))  # may be importances Ω
_WEIGHTED = tuple(n for n, m in METHODS_BY_NAME.items() if m.weighs_w)  # already weigh |w|: ranked as they are
_FROM_WEIGHTS = tuple(n for n, m in METHODS_BY_NAME.items() if m.source == "weights")  # |w|: no data, no sidecar
_AS_STORED = ("bias_score",)  # options a sidecar's scores are used with as stored (noted, never refused)


@dataclass(kw_only=True)
class PruneArgs(Args):
    checkpoint: Path = argument(metavar="CHECKPOINT", help="Checkpoint to prune.")
    by: list[str] = option(
        ["importance"],
        "--by",
        metavar="SCORE",
        choices=SCORES,
        help="Score: magnitude, importance, signal, fisher, mas or si (repeat with --sweep to compare).",
    )
    sparsity: Optional[float] = option(
        None,
        "--sparsity",
        "-s",
        metavar="S",
        low=0,
        high=1,
        high_open=True,
        help="Fraction of the selected weights to zero, in [0, 1).",
    )
    scope: str = option(
        "global",
        "--scope",
        metavar="SCOPE",
        choices=SCOPES,
        help="global (one threshold for all tensors), layer (same sparsity in each tensor), output (same sparsity in "
        "each output row: a Linear row, a conv output channel; in memory) or lamp (one threshold over each tensor's "
        "scores normalised as LAMP does, s²/Σ of the s'² ≥ s in that tensor, so tensors of different scales compare; "
        "in memory).",
    )
    output: Optional[Path] = option(None, "--output", "-o", metavar="FILE", help="Pruned checkpoint to write.")
    mask_out: Optional[Path] = option(
        None,
        "--mask-out",
        metavar="FILE",
        help="Write the keep-masks (1 keep, 0 pruned) to FILE for train-next --mask.",
    )
    importance: Optional[Path] = option(
        None,
        "--importance",
        metavar="FILE",
        help="Sidecar with the scores: the checkpoint's own or an ancestor's (default: beside the checkpoint).",
    )
    include: list[str] = option(
        [], "--include", metavar="GLOB", help="Also prune parameters whose names match GLOB (repeatable)."
    )
    exclude: list[str] = option(
        [], "--exclude", metavar="GLOB", help="Never prune parameters whose names match GLOB (repeatable)."
    )
    include_bias: bool = option(False, "--include-bias", help="Prune biases too.")
    include_norm: bool = option(False, "--include-norm", help="Prune normalisation weights too.")
    include_classifier: bool = option(False, "--include-classifier", help="Prune the classifier too.")
    sweep: Optional[str] = option(
        None, "--sweep", metavar="S1,S2,...", help="Evaluate these sparsities on --data without writing checkpoints."
    )
    data: list[str] = option([], "--data", "-d", metavar=DATA_METAVAR, help=DATA_HELP)
    score_data: list[str] = option(
        [],
        "--score-data",
        metavar=DATA_METAVAR,
        help="Data for computing signal/fisher/mas scores when no sidecar is given, and for re-estimating BatchNorm "
        "statistics after masking (default: --data).",
    )
    bias_score: str = option(
        METHODS_BY_NAME["signal"].options["bias_score"],
        "--bias-score",
        metavar="MODE",
        choices=BIAS_SCORES,
        help="--by signal on data: a bias scores its unit's output after the activation (post-activation; softmax "
        "for the classifier; the authors' code) or before it (pre-activation).",
    )
    rank: str = option(
        "auto",
        "--rank",
        metavar="RANK",
        choices=RANKS,
        help="--by importance/fisher/mas/si: rank an importance Ω by Ω·w² (saliency: the loss increase ½·Ω·w² of "
        "zeroing w under the quadratic model EWC's penalty and Optimal Brain Damage use; auto, the default, does "
        "so for Fisher, MAS and SI and ranks signal/magnitude scores as stored) or by Ω as stored (raw; the paper).",
    )
    fisher_labels: Optional[str] = option(
        None,
        "--fisher-labels",
        metavar="MODE",
        choices=FISHER_LABELS,
        help="--by fisher: empirical, sampled or exact (see importance); default: the sidecar's, or empirical.",
    )
    mas_output: Optional[str] = option(
        None,
        "--mas-output",
        metavar="OUTPUT",
        choices=MAS_OUTPUTS,
        help="--by mas: logits or softmax (see importance); default: the sidecar's, or logits.",
    )
    signal_norm: Optional[str] = option(
        None,
        "--signal-norm",
        metavar="NORM",
        choices=SIGNAL_NORMS,
        help="--by signal: sum (the paper) or mean of the input over each sample's positions (see importance); "
        "default: the sidecar's, or mean on data. A signal sidecar of another variant is refused.",
    )
    signal_stat: Optional[str] = option(
        None,
        "--signal-stat",
        metavar="STAT",
        choices=SIGNAL_STATS,
        help="--by signal: l1 (the paper) or l2 (Wanda) of the input (see importance); default: the sidecar's, or "
        "l2 on data. A signal sidecar of another variant is refused.",
    )
    bn_stats: str = option(
        "recompute",
        "--bn-stats",
        metavar="MODE",
        choices=BN_STATS,
        help="A model with BatchNorm, pruned with data given (--score-data, else --data): recompute (default) "
        "re-estimates the BatchNorm running statistics on that data after masking, in the pruned checkpoint and at "
        "every --sweep point (one pass without gradients, as torch.optim.swa_utils.update_bn; weights untouched), "
        "or keep the checkpoint's, which were measured with the unpruned weights.",
    )
    plot: Optional[Path] = option(
        None, "--plot", metavar="FILE", help="With --sweep: draw accuracy vs sparsity to FILE.png (needs matplotlib)."
    )
    batch_size: int = option(256, "--batch-size", "-b", metavar="N", low=1, help="Samples per batch.")
    device: str = device_option()
    data_options: DataOptions = group(DataOptions)
    force: bool = force_option()
    config: Optional[Path] = config_option()

    def validate(self) -> None:
        self.ignore_unless(
            any(b in _ON_DATA for b in self.by) or self.bn_stats == "recompute",
            ("score_data",),
            f"$by {', '.join(self.by)} with $bn_stats keep",
        )
        self.ignore_unless(bool(self.data or self.score_data), ("bn_stats",), "prune without $data or $score_data")
        self.ignore_unless("signal" in self.by, _AS_STORED, f"$by {', '.join(self.by)}")
        for m in METHODS_BY_NAME.values():  # the others apply to scores on data and are checked against a sidecar
            applies = m.name in self.by or "importance" in self.by
            self.ignore_unless(applies, tuple(o for o in m.options if o not in _AS_STORED), f"$by {', '.join(self.by)}")
        self.ignore_unless(any(b in _SALIENCY_SCORES for b in self.by), ("rank",), f"$by {', '.join(self.by)}")
        if self.sweep is None:
            self.levels: list[float] = []
            if self.sparsity is None:
                raise UsageError("prune needs $sparsity (or $sweep).")
            if self.output is None and self.mask_out is None:
                raise UsageError("prune needs $output (and/or $mask_out) to write the result.")
            if len(self.by) != 1:
                raise UsageError("Several $by values only make sense with $sweep; give one score.")
            if self.plot is not None:
                raise UsageError("$plot needs $sweep.")
            return
        if self.output is not None or self.mask_out is not None:
            raise UsageError("$sweep evaluates without writing checkpoints; drop $output/$mask_out or drop $sweep.")
        if self.sparsity is not None:
            raise UsageError("$sweep and $sparsity contradict each other; use one.")
        if not self.data:
            raise UsageError(
                "$sweep needs $data to evaluate on (repeat it for several tasks: a curve each and their mean)."
            )
        try:
            self.levels = [float(v) for v in self.sweep.split(",") if v.strip()]
        except ValueError as exc:
            raise UsageError(
                f"$sweep {self.sweep!r} must be comma-separated numbers in [0, 1), e.g. 0.5,0.9,0.99."
            ) from exc
        if not self.levels:
            raise UsageError("$sweep needs at least one sparsity.")
        if not all(0.0 <= s < 1.0 for s in self.levels):
            raise UsageError(f"$sweep values must be in [0, 1), got {self.sweep}.")


def _has_bn_stats(names) -> bool:
    """Whether tensor names include BatchNorm running statistics (``<layer>.running_mean``)."""
    return any(n == "running_mean" or n.endswith(".running_mean") for n in names)


def _bn_field(args: PruneArgs) -> str | None:
    """The option whose data re-estimates BatchNorm statistics after masking: score_data, else data; None: no data or
    ``--bn-stats keep``."""
    if args.bn_stats != "recompute":
        return None
    return "score_data" if args.score_data else "data" if args.data else None


def _note_unused_score_data(args: PruneArgs, names, out: Output) -> None:
    """``--score-data`` serves data-based scores and BatchNorm statistics; with neither here it is noted as unused."""
    if (
        args.score_data
        and args.bn_stats == "recompute"  # with keep, validate() has noted it already
        and not any(b in _ON_DATA for b in args.by)
        and not _has_bn_stats(names)
    ):
        out.log(f"note: $by {', '.join(args.by)} on a model without BatchNorm ignores $score_data (not used there).")


class _Tasks:
    """Several opened tasks read one after another: BatchNorm statistics re-estimated over all of them."""

    def __init__(self, tasks: list) -> None:
        self.tasks = tasks

    @property
    def name(self) -> str:
        return " + ".join(t.spec.name for t in self.tasks)

    def batches(self, *, batch_size: int, device):
        for task in self.tasks:
            yield from task.batches(batch_size=batch_size, device=device)

    def describe(self) -> dict[str, Any] | list[dict[str, Any]]:
        docs = [t.describe() for t in self.tasks]
        return docs[0] if len(docs) == 1 else docs


def _open_field(args: PruneArgs, field: str, ckpt, **kwargs) -> list:
    """The tasks of ``--score-data`` (training data) or ``--data`` (evaluation data), opened for ``ckpt``."""
    from cl_tool.data import open_tasks, task_specs

    role = "train" if field == "score_data" else "eval"
    return open_tasks(
        task_specs(getattr(args, field), args.data_options, field, role=role), ckpt.spec, args.data_options, **kwargs
    )


def _open_bn_tasks(args: PruneArgs, field: str, ckpt, stack) -> _Tasks:
    """The tasks of ``field`` (entered on ``stack``) that BatchNorm statistics are re-estimated on, in order."""
    tasks = _open_field(args, field, ckpt)
    return _Tasks([stack.enter_context(t) for t in tasks])  # labels are not read: the statistics need the images only


def _bn_note(
    args: PruneArgs, field: str, tasks: _Tasks, rec: dict[str, Any], out: Output, sweep: bool
) -> dict[str, Any]:
    """Log and return the record of a re-estimation after masking."""
    where = (
        " (the evaluation data; $score_data TRAIN estimates them on training data instead)"
        if sweep and field == "data"
        else ""
    )
    out.log(
        f"BatchNorm statistics re-estimated after masking{' at every sparsity' if sweep else ''} over "
        f"{rec['samples']:,} samples of {tasks.name}{where}; $bn_stats keep keeps the checkpoint's."
    )
    return {"method": "recomputed", "data": tasks.describe(), **rec}


def _selected(args: PruneArgs, named: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    """The parameters the selection options pick (``--include/--exclude``, biases, norms, the classifier)."""
    from cl_tool.pruning import select_prunable

    return select_prunable(
        named,
        include=args.include or None,
        exclude=args.exclude or None,
        include_bias=args.include_bias,
        include_norm=args.include_norm,
        include_classifier=args.include_classifier,
        classifier_names=tuple(layout["classifier"]),
    )


def method_options(args: PruneArgs, by: str) -> dict[str, str]:
    """The options of method ``by`` that prune computes it with on data: those given, the method's defaults for those
    left out (signal: mean, l2)."""
    return {k: getattr(args, k) or v for k, v in METHODS_BY_NAME[by].options.items()}


def _check_stored_options(args: PruneArgs, by: str, sc, path, out: Output) -> None:
    """A sidecar ranks only under the options it was computed with (a signal sidecar without the record: the paper's
    variant): an explicit other one is exit 4; its bias scores are used as stored, whatever $bias_score says (noted)."""
    from cl_tool.importance import stored_signal_variant

    options = METHODS_BY_NAME[sc.method].options if sc.method in METHODS_BY_NAME else {}
    stored = {**sc.options, **(stored_signal_variant(sc.options) if "signal_stat" in options else {})}
    bias = sc.options.get("bias_score", "pre-activation")  # sidecars from before the option: pre-activation
    if by == sc.method and "bias_score" in options and bias != args.bias_score:
        out.log(f"note: {path} holds {by} scores with {bias} bias scores; they are used as stored.")
    asked = {k: getattr(args, k) for k in options if k not in _AS_STORED and k in stored}
    wrong = next((k for k, v in asked.items() if v is not None and v != str(stored[k])), None)
    if wrong is not None:
        raise IncompatibleError(
            f"${wrong} {asked[wrong]} but {path} holds {sc.method} scores computed with {stored[wrong]}; recompute "
            f"them with `cl-tool importance --method {sc.method} ${wrong} {asked[wrong]}`, or drop ${wrong}."
        )


def compute_scores(
    args: PruneArgs, by: str, ckpt, get_model, named: dict[str, Any], device, out: Output
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores for every named parameter, and a record of where they came from; with ``--rank saliency`` (an
    importance Ω), Ω·w² (:func:`saliency`).

    ``get_model()`` returns the materialised model; it is only called for scores computed on data.
    """
    scores, record = _raw_scores(args, by, ckpt, get_model, named, device, out)
    if _rank(args, by, record.get("method", by)) == "saliency":
        scores, record = saliency(scores, named), {**record, "rank": "saliency"}
    return scores, record


def _rank(args: PruneArgs, by: str, held: str) -> str:
    """How scores of method ``held`` (a sidecar's, or ``by`` computed on data) are ranked for ``--by by``: "saliency"
    (Ω·w²) for an importance Ω unless ``--rank raw``; "raw" for scores that already weigh |w| (signal, magnitude),
    where an explicit ``--rank saliency`` is exit 4."""
    if by not in _SALIENCY_SCORES:
        return "raw"
    if held in _WEIGHTED:
        if args.rank == "saliency":
            raise IncompatibleError(
                f"$rank saliency multiplies an importance by w², but {args.importance or 'the sidecar'} holds {held} "
                f"scores, which already weigh |w|; use $rank raw, or a fisher/mas/si sidecar."
            )
        return "raw"
    return "raw" if args.rank == "raw" else "saliency"


def saliency(scores: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """Ω·w² per element (float32, CPU): the loss increase of zeroing w under a diagonal quadratic model of the
    loss with curvature Ω is ½·Ω·w² (Optimal Brain Damage, LeCun et al. 1990); the ½ does not change a ranking."""
    return {n: scores[n].float() * named[n].detach().float().cpu().square() for n in scores}


def _no_sidecar(by: str, path) -> BadInputError:
    return BadInputError(
        f"$by {by} needs an importance sidecar, and {path} does not exist; run `cl-tool importance` "
        f"(or train-next $si_out) first, or pass $importance."
    )


def _serves(args: PruneArgs, by: str, sc, path) -> bool:
    """Whether sidecar ``sc`` holds the scores of ``--by by`` (``importance``: any method's); False when it holds
    another method's, no $importance was given and ``by`` is computed on data instead; exit 2 otherwise."""
    if by in ("importance", sc.method):
        return True
    if args.importance is None and by in _ON_DATA:
        return False
    raise UsageError(
        f"$by {by} but $importance {path} holds {sc.method} importances; pass a {by} sidecar or $by importance."
    )


def _check_sidecar_for(args: PruneArgs, by: str, sc, path, ckpt, stored, params, fit, out: Output):
    """Check sidecar ``sc`` (at ``path``) for ``--by by`` on ``ckpt``: the checkpoint's own or a recorded ancestor's
    (exit 4 otherwise), its options, one entry per parameter (``stored``: name → stored shape; ``params``: name →
    shape) and the shapes of the names ``fit`` (rows a grown head gained since are allowed); its
    :class:`~cl_tool.lineage.SidecarUse` and the record of the scores' source."""
    from cl_tool.lineage import check_sidecar, fit_problem
    from cl_tool.sidecar import check_names

    where = str(args.checkpoint)
    use = check_sidecar(sc, ckpt, where)
    if use.note:
        out.log(use.note)
    _check_stored_options(args, by, sc, path, out)
    check_names(path, stored, params, where)
    problem = fit_problem(stored, {n: params[n] for n in fit}, use.grown)
    if problem is not None:
        name, have, want = problem
        raise IncompatibleError(
            f"Importance of {name!r} in {path} has shape {have}, but {where} has {want}; recompute it with "
            f"`cl-tool importance {where}`."
        )
    return use, {"by": by, "method": sc.method, "options": sc.options, "tasks": len(sc.tasks), **use.record()}


def _raw_scores(
    args: PruneArgs, by: str, ckpt, get_model, named: dict[str, Any], device, out: Output
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scores as stored or computed (before ``--rank``), and a record of where they came from."""
    import torch

    from cl_tool.importance import compute_importance
    from cl_tool.lineage import fit_rows
    from cl_tool.sidecar import default_sidecar_path, load_sidecar

    if by in _FROM_WEIGHTS:
        return {n: p.detach().abs().float().cpu() for n, p in named.items()}, {"by": by}
    path = args.importance or default_sidecar_path(args.checkpoint)
    if path.exists():
        sc = load_sidecar(path)
        if _serves(args, by, sc, path):
            shapes = {n: tuple(p.shape) for n, p in named.items()}
            stored = {n: tuple(t.shape) for n, t in sc.tensors.items()}
            use, record = _check_sidecar_for(args, by, sc, path, ckpt, stored, shapes, shapes, out)
            return fit_rows(sc.tensors, named, use.grown), record  # the rows a grown head gained score 0
    if by not in _ON_DATA:
        raise _no_sidecar(by, path)
    field = "score_data" if args.score_data else "data"
    if len(getattr(args, field)) != 1:
        raise UsageError(
            f"$by {by} without a {by} sidecar computes the scores on data: give one $score_data (or $data)."
        )
    (task,) = _open_field(args, field, ckpt, log=out.log, match=True)
    options = method_options(args, by)
    with task:
        scores = compute_importance(
            get_model(),
            ((b.x, b.y) for b in task.batches(batch_size=args.batch_size, device=device)),
            by,
            device=device,
            generator=torch.Generator(device="cpu").manual_seed(0),  # sampled Fisher labels: importance's --seed 0
            **options,
        )
    if task.cache_note:
        out.log(task.cache_note)
    record = {"by": by, "computed_on": task.describe(), **options}
    return {n: scores[n].cpu() for n in named}, record


def _sweep(args: PruneArgs, out: Output, ckpt, get_model, named, chosen, make_masks, device) -> dict[str, Any]:
    """Accuracy on every ``--data`` task at every sparsity of the sweep, for every ``--by`` score, and their mean over
    the tasks; writes nothing but the plot."""
    from cl_tool.data import check_unique_names, open_tasks, task_specs

    specs = task_specs(args.data, args.data_options, role="eval")
    check_unique_names(specs)
    with ExitStack() as stack:
        tests = open_tasks(specs, ckpt.spec, args.data_options, log=out.log, match=True)
        try:
            for t in tests:
                stack.enter_context(t)
            field = _bn_field(args) if _has_bn_stats(ckpt.state) else None
            bn_tasks = (
                _open_bn_tasks(args, field, ckpt, stack)
                if field == "score_data"
                else _Tasks(tests)
                if field == "data"
                else None
            )
            return _sweep_on(args, out, ckpt, get_model, named, chosen, make_masks, device, tests, bn_tasks)
        finally:
            for t in tests:
                if t.cache_note:
                    out.log(t.cache_note)


def _evaluate_all(model, tests, args: PruneArgs, device) -> dict[str, float]:
    from cl_tool.evaluation import evaluate_task

    return {t.spec.name: evaluate_task(model, t, device=device, batch_size=args.batch_size)[0] for t in tests}


def _sweep_on(
    args: PruneArgs, out: Output, ckpt, get_model, named, chosen, make_masks, device, tests, bn_tasks
) -> dict[str, Any]:
    """The sweep on the opened ``tests``; ``bn_tasks``: the tasks BatchNorm statistics are re-estimated on after
    masking at every sparsity, or None. Each point's ``accuracy`` is the mean over the tasks (the task's own for one),
    ``tasks`` each task's."""
    import torch

    from cl_tool.training import recompute_bn_stats

    model = get_model()
    params = dict(model.named_parameters())
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = _evaluate_all(model, tests, args, device)
    base_acc = sum(base.values()) / len(base)
    curves: dict[str, list[dict[str, Any]]] = {}
    bn = None
    for by in args.by:
        scores, _ = compute_scores(args, by, ckpt, get_model, named, device, out)
        scores = {n: scores[n] for n in chosen}
        curve = []
        for s in args.levels:
            with torch.no_grad():
                for n, m in make_masks(scores, s).items():
                    params[n].masked_fill_(m.to(params[n].device).logical_not(), 0)
            if bn_tasks is not None:
                rec = recompute_bn_stats(model, bn_tasks, device=device, batch_size=args.batch_size)
                if rec is not None and bn is None:
                    field = "data" if bn_tasks.tasks == tests else "score_data"
                    bn = _bn_note(args, field, bn_tasks, rec, out, True)
            acc = _evaluate_all(model, tests, args, device)
            curve.append({"sparsity": s, "accuracy": sum(acc.values()) / len(acc), "tasks": acc})
            model.load_state_dict(original)
        curves[by] = curve
    names = list(base)
    where = names[0] if len(names) == 1 else f"{', '.join(names)} (mean over the tasks)"
    if len(names) == 1:
        header, rows = (
            ["sparsity"] + list(curves),
            [[f"{s:g}"] + [curves[b][i]["accuracy"] for b in curves] for i, s in enumerate(args.levels)],
        )
    else:
        header = ["sparsity"] + [f"{b} {n}" for b in curves for n in [*names, "mean"]]
        rows = [
            [f"{s:g}"]
            + [curves[b][i]["tasks"].get(n, curves[b][i]["accuracy"]) for b in curves for n in [*names, "mean"]]
            for i, s in enumerate(args.levels)
        ]
    out.table(f"accuracy vs sparsity on {where} (unpruned {base_acc:.4f})", header, rows)
    if args.plot is not None:
        from cl_tool.plots import plot_prune_curves

        plot_prune_curves(
            {b: [(p["sparsity"], p["accuracy"]) for p in c] for b, c in curves.items()},
            args.plot,
            title=f"{Path(str(args.checkpoint)).name} on {where}",
            force=args.force,
        )
    return out.result(
        {
            "checkpoint": str(args.checkpoint),
            "data": tests[0].describe() if len(tests) == 1 else [t.describe() for t in tests],
            "scope": args.scope,
            "unpruned_accuracy": base_acc,
            "unpruned": base,
            "bn_stats": bn,
            "sparsities": args.levels,
            "curves": curves,
        }
    )


def run_prune(args: PruneArgs, out: Output) -> dict[str, Any]:
    """Prune ``args.checkpoint`` by one score to ``args.sparsity`` (checkpoint and/or masks), or run the sweep."""
    from cl_tool.atomic import FileRoles
    from cl_tool.checkpoint import (
        build_on_meta_device,
        instantiate,
        load_checkpoint,
        model_layout,
        save_checkpoint,
        validate_layout,
    )
    from cl_tool.data import local_paths, task_specs
    from cl_tool.masks import save_mask
    from cl_tool.pruning import apply_masks, global_masks, lamp_masks, layer_masks, output_masks, sparsity_report
    from cl_tool.runtime import keep_freed_memory, resolve_device
    from cl_tool.sidecar import default_sidecar_path

    roles = FileRoles(force=args.force)
    roles.input(args.checkpoint, "the checkpoint")
    if not all(b in _FROM_WEIGHTS for b in args.by):
        roles.input(
            args.importance or default_sidecar_path(args.checkpoint),
            "$importance" if args.importance else "the importance file beside the checkpoint",
        )
    roles.input(args.config, "$config")
    for field in ("data", "score_data"):
        for path in local_paths(task_specs(getattr(args, field), args.data_options, field)):
            roles.input(path, f"${field}")
    roles.output(args.output, "$output")
    roles.output(args.mask_out, "$mask_out")
    roles.output(args.plot, "$plot")
    roles.check()
    if args.device not in ("auto", "cpu"):  # a missing device is an error on either path (streaming runs on none)
        resolve_device(args.device)
    streaming = _streaming_file(args)
    if streaming is not None:
        return _prune_file(args, out, *streaming)
    device = resolve_device(args.device)
    keep_freed_memory()
    ckpt = load_checkpoint(args.checkpoint)
    _note_unused_score_data(args, ckpt.state, out)
    if ckpt.layout is not None and "spec" in ckpt.layout:  # written by cl-tool: names/shapes recorded, no rebuild
        validate_layout(ckpt)
        layout = ckpt.layout
    else:  # e.g. a timm folder: build the architecture on the meta device (no memory) to learn its layout
        layout = model_layout(build_on_meta_device(ckpt))
    materialised: list[Any] = []

    def get_model():
        """The real model (built once, only when data has to flow through it); shares ckpt.state's values."""
        if not materialised:
            materialised.append(instantiate(ckpt).to(device))
        return materialised[0]

    named = {n: ckpt.state[n] for n in layout["parameters"]}
    chosen = _selected(args, named, layout)
    make_masks = {"global": global_masks, "layer": layer_masks, "output": output_masks, "lamp": lamp_masks}[args.scope]
    if args.sweep is not None:
        return _sweep(args, out, ckpt, get_model, named, chosen, make_masks, device)

    by = args.by[0]
    scores, source = compute_scores(args, by, ckpt, get_model, named, device, out)
    masks = make_masks({n: scores[n] for n in chosen}, args.sparsity)
    del scores
    _ = ckpt.fingerprint  # hashed (and cached for the record) as read, before masking changes the tensors in place
    bn = None
    field = _bn_field(args) if _has_bn_stats(ckpt.state) else None
    if field is not None:
        from cl_tool.training import recompute_bn_stats

        model = get_model()
        apply_masks(dict(model.named_parameters()), masks)
        with ExitStack() as stack:
            tasks = _open_bn_tasks(args, field, ckpt, stack)
            rec = recompute_bn_stats(model, tasks, device=device, batch_size=args.batch_size)
            bn = _bn_note(args, field, tasks, rec, out, False) if rec is not None else None
    state = {k: v.detach().cpu() for k, v in (materialised[0].state_dict() if materialised else ckpt.state).items()}
    apply_masks(state, masks)
    rows, total = sparsity_report(masks)

    def write(path, metadata) -> str:
        return save_checkpoint(
            path, ckpt.spec, state, metadata["history"], extra=metadata["extra"], force=args.force, layout=layout
        )

    def write_mask(path) -> None:
        save_mask(
            path, masks, by=by, scope=args.scope, sparsity=args.sparsity, fingerprint=ckpt.fingerprint, force=args.force
        )

    return _finish(args, out, ckpt, by, source, rows, total, write, write_mask, bn)


def _finish(
    args: PruneArgs, out: Output, ckpt, by: str, source: dict[str, Any], rows, total, write, write_mask, bn=None
) -> dict[str, Any]:
    """Report the sparsity, write the pruned checkpoint (``write(path, {"history", "extra"}) -> fingerprint``) and masks, all or nothing."""
    from cl_tool.atomic import all_or_nothing
    from cl_tool.checkpoint import history_entry
    from cl_tool.runtime import command_line

    out.table(
        f"sparsity by parameter ({by}, {args.scope})",
        ["parameter", "numel", "pruned", "sparsity"],
        [[n, numel, pruned, frac] for n, numel, pruned, frac in rows],
    )
    record = {
        "by": by,
        "scope": args.scope,
        "requested_sparsity": args.sparsity,
        "achieved_sparsity": total.fraction,
        "pruned": total.pruned,
        "selected": total.numel,
        "source": source,
        "per_layer": {n: frac for n, _, _, frac in rows},
        **({"bn_stats": bn} if bn is not None else {}),
    }
    result = {
        "output": str(args.output) if args.output else None,
        "mask_out": str(args.mask_out) if args.mask_out else None,
        **record,
    }
    with all_or_nothing() as wrote:
        if args.output is not None:
            hist = ckpt.history + [
                history_entry(
                    "prune",
                    argv=command_line(),
                    by=by,
                    scope=args.scope,
                    sparsity=args.sparsity,
                    achieved=total.fraction,
                    source_fingerprint=ckpt.fingerprint,
                    importance=source.get("sidecar"),
                    importance_fingerprint=source.get("sidecar_fingerprint"),
                    importance_generations=source.get("generations"),
                    bn_stats=bn,
                )
            ]
            result["fingerprint"] = write(args.output, {"history": hist, "extra": {**ckpt.extra, "pruning": record}})
            wrote(args.output)
        if args.mask_out is not None:
            write_mask(args.mask_out)
            wrote(args.mask_out)
    out.log(
        f"Pruned {total.pruned:,} of {total.numel:,} selected weights ({total.fraction:.4%}) by {by} ({args.scope})"
        f"{f'; wrote {args.output}' if args.output else ''}{f'; masks in {args.mask_out}' if args.mask_out else ''}."
    )
    return out.result(result)


def _streaming_file(args: PruneArgs):
    """(the checkpoint file opened for numpy, its layout record) when prune streams it, else None (in memory).

    Streaming: one pruned checkpoint (no $sweep) from a cl-tool checkpoint file with a layout record, scope global or
    layer, scores |w| or stored in a sidecar (signal/fisher/mas: with $importance given), no BatchNorm statistics to
    re-estimate on data, and every dtype one numpy reads (not float8).
    """
    from cl_tool.checkpoint import layout_from_metadata
    from cl_tool.prune_stream import TensorFile

    if args.sweep is not None or not args.checkpoint.is_file() or args.scope not in ("global", "layer"):
        return None
    if args.by[0] in _ON_DATA and not (args.importance is not None and args.importance.exists()):
        return None
    try:
        tf = TensorFile(args.checkpoint, "Checkpoint")
    except NotImplementedError:  # a dtype numpy does not read (float8)
        return None
    if "cl_tool.model" in tf.metadata and not (_bn_field(args) is not None and _has_bn_stats(tf.header)):
        layout = layout_from_metadata(tf.metadata, str(args.checkpoint))
        if layout is not None and "spec" in layout:
            return tf, layout
    tf.close()
    return None


def _stream_scores(args: PruneArgs, out: Output, tf, ckpt, shapes, chosen):
    """(scores, their sources, the cut planner, the record of where they came from) for the streaming path; the
    checkpoint is checked and fingerprinted on the way (|w| observed by the planner meanwhile)."""
    from cl_tool.prune_stream import (
        MagnitudeScores,
        SaliencyScores,
        SidecarScores,
        TensorFile,
        check_and_fingerprint,
        check_sidecar_values,
    )
    from cl_tool.pruning import CutPlanner
    from cl_tool.sidecar import default_sidecar_path, sidecar_from_metadata

    by, where = args.by[0], str(args.checkpoint)
    if by in _FROM_WEIGHTS:
        scores = MagnitudeScores(tf)
        sources = scores.sources(chosen, shapes)
        planner = CutPlanner(sources, args.sparsity, args.scope)
        ckpt._fp = check_and_fingerprint(tf, where, planner)
        return scores, sources, planner, {"by": by}
    ckpt._fp = check_and_fingerprint(tf, where)
    path = args.importance or default_sidecar_path(args.checkpoint)
    if not path.exists():
        raise _no_sidecar(by, path)
    sc_file = TensorFile(path, "Importance file")
    sc = sidecar_from_metadata(sc_file.metadata, path)
    _serves(args, by, sc, path)  # True here: scores on data are not streamed
    stored = {n: sc_file.shape(n) for n in sc_file.header}
    use, record = _check_sidecar_for(args, by, sc, path, ckpt, stored, shapes, chosen, out)
    rank = _rank(args, by, sc.method)
    grown = set(use.grown)
    scores = SaliencyScores(sc_file, tf, shapes, grown) if rank == "saliency" else SidecarScores(sc_file, shapes, grown)
    sources = scores.sources(chosen, shapes)
    planner = CutPlanner(sources, args.sparsity, args.scope)
    # the planner's first read of each score, unless the scores are Ω·w² (then the planner reads them itself)
    check_sidecar_values(sc_file, str(path), *((planner, scores) if rank == "raw" else ()))
    return scores, sources, planner, {**record, **({"rank": rank} if rank == "saliency" else {})}


def _prune_file(args: PruneArgs, out: Output, tf, layout: dict[str, Any]) -> dict[str, Any]:
    """Prune the cl-tool checkpoint file ``tf`` (see :func:`_streaming_file`) by |w| or stored scores with numpy, one
    tensor at a time (no torch, memory of one tensor)."""
    from cl_tool.checkpoint import Checkpoint, metadata_json, spec_from_metadata, validate_layout
    from cl_tool.masks import mask_metadata
    from cl_tool.prune_stream import write_masks, write_pruned
    from cl_tool.pruning import TensorInfo, sparsity_rows
    from cl_tool.safetensors_io import DTYPE_NAMES

    by, where, meta = args.by[0], str(args.checkpoint), tf.metadata
    _note_unused_score_data(args, tf.header, out)
    ckpt = Checkpoint(
        spec=spec_from_metadata(meta, where),
        state={},
        history=metadata_json(meta, "cl_tool.history", where, [], (list,)),
        extra=metadata_json(meta, "cl_tool.extra", where, {}, (dict,)),
        path=where,
        layout=layout,
    )
    validate_layout(ckpt, {n: (e["shape"], DTYPE_NAMES[e["dtype"]]) for n, e in tf.header.items()})
    shapes = {n: tf.shape(n) for n in layout["parameters"]}
    named = {n: TensorInfo(shapes[n], layout["tensors"][n][1]) for n in layout["parameters"]}
    chosen = _selected(args, named, layout)
    scores, sources, planner, source = _stream_scores(args, out, tf, ckpt, shapes, chosen)
    plan = planner.plan()
    rows, total = sparsity_rows((src.name, src.numel, plan.pruned(src.name)) for src in sources)

    def write(path, metadata) -> str:
        history, extra = json.dumps(trim_history(metadata["history"])), json.dumps(metadata["extra"])
        new_meta = {**meta, "cl_tool.history": history, "cl_tool.extra": extra}
        return write_pruned(tf, plan, scores, set(chosen), path, new_meta, force=args.force)

    def write_mask(path) -> None:
        mask_meta = mask_metadata(by=by, scope=args.scope, sparsity=args.sparsity, fingerprint=ckpt.fingerprint)
        write_masks(plan, sources, path, mask_meta, force=args.force)

    return _finish(args, out, ckpt, by, source, rows, total, write, write_mask)
