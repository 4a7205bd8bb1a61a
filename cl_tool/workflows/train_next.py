"""``cl-tool train-next``: train a checkpoint on the next task under an EWC-family penalty."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool import checkpoint, distributed, plots, runtime  # module calls: tests spy on them
from cl_tool.atomic import FileRoles, LineFile, all_or_nothing
from cl_tool.checkpoint import first_nonfinite, grow_classifier, history_entry, load_model, model_layout
from cl_tool.data import (
    DATA_HELP,
    DATA_METAVAR,
    DataOptions,
    check_labels,
    check_unique_names,
    local_paths,
    open_tasks,
    parse_augment,
    task_specs,
)
from cl_tool.data.transforms import check_augment_fits, small_input_augment
from cl_tool.errors import BadInputError, DivergedError, IncompatibleError, OutputError, UsageError
from cl_tool.lineage import check_sidecar, fit_rows
from cl_tool.masks import load_mask
from cl_tool.models import trainable_parameters
from cl_tool.output import Output
from cl_tool.params import FLOAT32_MAX, Args, argument, config_option, force_option, group, option
from cl_tool.penalty import PENALTIES, QuadraticPenalty, divergence_bound
from cl_tool.resume import ResumeState
from cl_tool.runtime import (
    command_line,
    deterministic_error,
    device_option,
    keep_freed_memory,
    precision_option,
    seed_option,
    set_cuda_precision,
    set_deterministic,
    started_at,
)
from cl_tool.sidecar import Sidecar, check_covers, default_sidecar_path, load_sidecar, save_sidecar
from cl_tool.training import BN_STATS, OPTIMIZERS, SCHEDULES, TRAIN_EVAL_SAMPLES, TrainConfig, train

DEFAULT_LAMBDA = 100.0
TRAINING = TrainConfig()  # the training options' defaults: one source, TrainConfig


@dataclass(kw_only=True)
class TrainNextArgs(Args):
    checkpoint: Path = argument(
        metavar="CHECKPOINT",
        help="Checkpoint to continue from (.safetensors or timm folder); its parameters are the anchor θ*.",
    )
    data: list[str] = option(..., "--data", "-d", metavar=DATA_METAVAR, help=DATA_HELP)
    output: Path = option(..., "--output", "-o", metavar="FILE", help="Checkpoint to write.")
    penalty: str = option(
        "stabilized",
        "--penalty",
        metavar="KIND",
        panel="Penalty",
        choices=PENALTIES,
        help="stabilized, ewc, online-ewc or none.",
    )
    lam: Optional[str] = option(
        None,
        "--lambda",
        metavar="λ[,λ...]",
        panel="Penalty",
        help="Penalty strength λ ≥ 0 (default 100 when an importance file is used). Several, comma-separated, train one "
        "model per λ from the same checkpoint in this process (needs --eval-data): OUT.lambda-λ.safetensors each, and a "
        "table of eval accuracy per λ (and --plot).",
    )
    importance: Optional[Path] = option(
        None,
        "--importance",
        metavar="FILE",
        panel="Penalty",
        help="Importance sidecar of the checkpoint or an ancestor (default: <checkpoint stem>.importance.safetensors beside it).",
    )
    freeze_bn_stats: bool = option(
        TRAINING.freeze_bn_stats,
        "--freeze-bn-stats",
        panel="Penalty",
        help="Keep BatchNorm running mean/variance fixed (BatchNorm layers in eval mode): the penalty protects weights, "
        "not these statistics, which otherwise drift to the new task.",
    )
    bn_stats: str = option(
        TRAINING.bn_stats,
        "--bn-stats",
        metavar="MODE",
        panel="Penalty",
        choices=BN_STATS,
        help="BatchNorm running statistics written with the model: recompute (default: re-estimated after the last "
        "epoch with the final weights, one pass without gradients or augmentation over the task, as "
        "torch.optim.swa_utils.update_bn; weights untouched) or keep (training's moving average, which lags the "
        "weights). Not with --freeze-bn-stats.",
    )
    optimizer: str = option(
        TRAINING.optimizer,
        "--optimizer",
        metavar="NAME",
        panel="Optimisation",
        choices=OPTIMIZERS,
        help="adam, adamw or sgd.",
    )
    lr: float = option(
        TRAINING.lr, "--lr", metavar="η", panel="Optimisation", low=0, low_open=True, help="Learning rate η."
    )
    momentum: float = option(
        TRAINING.momentum, "--momentum", metavar="μ", panel="Optimisation", low=0, help="SGD momentum."
    )
    nesterov: bool = option(TRAINING.nesterov, "--nesterov", panel="Optimisation", help="Nesterov momentum (SGD).")
    weight_decay: float = option(
        TRAINING.weight_decay, "--weight-decay", metavar="WD", panel="Optimisation", low=0, help="Weight decay."
    )
    schedule: str = option(
        TRAINING.schedule,
        "--schedule",
        metavar="NAME",
        panel="Optimisation",
        choices=SCHEDULES,
        help="constant or cosine.",
    )
    warmup_steps: int = option(
        TRAINING.warmup_steps, "--warmup-steps", metavar="N", panel="Optimisation", low=0, help="Linear warm-up steps."
    )
    grad_clip: Optional[float] = option(
        TRAINING.grad_clip,
        "--grad-clip",
        metavar="NORM",
        panel="Optimisation",
        low=0,
        low_open=True,
        help="Clip the total gradient norm (task + penalty) to NORM.",
    )
    epochs: int = option(
        TRAINING.epochs, "--epochs", "-e", metavar="N", panel="Optimisation", low=1, help="Epochs over the new task."
    )
    batch_size: int = option(
        TRAINING.batch_size, "--batch-size", "-b", metavar="N", panel="Optimisation", low=1, help="Samples per batch."
    )
    seed: int = seed_option()
    device: str = device_option()
    precision: str = precision_option()
    deterministic: bool = option(
        False,
        "--deterministic",
        help="torch.use_deterministic_algorithms(True) (bit-reproducible runs and resumes on CPU).",
    )
    si_out: Optional[Path] = option(
        None,
        "--si-out",
        metavar="FILE",
        panel="Importance",
        help="Also write Synaptic Intelligence importances of this task to FILE (a sidecar of the output).",
    )
    si_xi: float = option(
        0.1,
        "--si-xi",
        metavar="ξ",
        panel="Importance",
        low=0,
        low_open=True,
        help="SI damping ξ in Ω = Σ -g·Δθ / (Δθ_total² + ξ).",
    )
    mask: Optional[Path] = option(
        None,
        "--mask",
        metavar="FILE",
        panel="Pruning",
        help="Mask file from `prune --mask-out` (values 0 or 1); pruned weights stay zero.",
    )
    augment: str = option(
        "none",
        "--augment",
        metavar="AUG",
        panel="Optimisation",
        help="Training augmentation: none, shift=K (random translation by up to K pixels, zero fill) or timm "
        "(timm's training transform: random-resized-crop, flip, colour jitter). Task transforms apply after it.",
    )
    augment_arg: list[str] = option(
        [],
        "--augment-arg",
        metavar="KEY=VALUE",
        panel="Optimisation",
        help="An option of timm's training transform (repeatable), e.g. auto_augment=rand-m9-mstd0.5 or hflip=0.",
    )
    grow_head: bool = option(
        False,
        "--grow-head",
        help="If the data has more classes than the model, add output rows (their importance is 0).",
    )
    eval_data: list[str] = option(
        [],
        "--eval-data",
        metavar=DATA_METAVAR,
        panel="Logging",
        help="Evaluate on these datasets after every epoch (repeatable; old tasks too, to watch forgetting).",
    )
    plot: Optional[Path] = option(
        None,
        "--plot",
        metavar="FILE",
        panel="Logging",
        help="With several --lambda values: draw each --eval-data task's accuracy and their mean against λ (log axis) "
        "to FILE.png (needs matplotlib).",
    )
    log_json: Optional[Path] = option(
        None, "--log-json", metavar="FILE", panel="Logging", help="Write one JSON object per epoch to FILE."
    )
    checkpoint_every: int = option(
        TRAINING.checkpoint_every,
        "--checkpoint-every",
        metavar="N",
        panel="Resume",
        low=0,
        help="Write a resumable state every N steps (and on SIGTERM/SIGINT).",
    )
    resume: bool = option(False, "--resume", panel="Resume", help="Continue from the resumable state if it exists.")
    state_file: Optional[Path] = option(
        None,
        "--state-file",
        metavar="FILE",
        panel="Resume",
        help="Resumable state path (default <output stem>.resume.safetensors).",
    )
    data_options: DataOptions = group(DataOptions)
    force: bool = force_option()
    config: Optional[Path] = config_option()

    def validate(self) -> None:
        self.lambdas = parse_lambdas(self.lam)
        self.lam = self.lambdas[0] if len(self.lambdas) == 1 else None
        if len(self.lambdas) > 1:
            check_sweep(self)
        elif self.plot is not None:
            raise UsageError(
                "$plot draws accuracy against λ; give several $lam values (e.g. 100,1000,10000), or draw one model's "
                "accuracy with `cl-tool evaluate --plot`."
            )
        if self.penalty == "none" and self.importance is not None:
            raise UsageError("$penalty none and $importance contradict each other; drop one.")
        if self.penalty == "none" and any(self.lambdas):
            raise UsageError("$penalty none and $lam contradict each other; drop one.")
        if len(self.data) != 1:
            raise UsageError(
                f"train-next takes exactly one $data (got {len(self.data)}); train tasks one after another."
            )
        self.ignore_unless(self.optimizer == "sgd", ("momentum", "nesterov"), f"$optimizer {self.optimizer}")
        self.ignore_unless(self.si_out is not None, ("si_xi",), "training without $si_out")
        self.ignore_unless(not self.freeze_bn_stats, ("bn_stats",), "$freeze_bn_stats")
        if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
            raise UsageError("$nesterov needs $momentum > 0.")

        self.augmentation = parse_augment(self.augment, self.augment_arg)

    def train_config(self) -> TrainConfig:
        """The training options as a TrainConfig (each field is the option of its name; no --eval-batch-size)."""
        names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "eval_batch_size"]
        return TrainConfig(**{name: getattr(self, name) for name in names})

    @property
    def state_path(self) -> Path:
        """The resumable state: ``--state-file`` or ``<output stem>.resume.safetensors``."""
        if self.state_file is not None:
            return self.state_file
        name = self.output.name.removesuffix(".safetensors")
        return self.output.with_name(name + ".resume.safetensors")


def parse_lambdas(text: Any) -> list[float | None]:
    """``--lambda`` → its values (``[None]`` when not given); UsageError for a value that is not a finite λ ≥ 0."""
    if text is None:
        return [None]
    values = []
    for item in str(text).split(","):
        try:
            lam = float(item)
        except ValueError as exc:
            raise UsageError(
                f"$lam {text!r} must be a number or comma-separated numbers, e.g. 100,1000,10000."
            ) from exc
        if not math.isfinite(lam) or abs(lam) > 3.4e38:
            raise UsageError(f"$lam must be a finite number no larger than 3.4e38 in magnitude, got {item.strip()}.")
        if lam < 0:
            raise UsageError(f"$lam must be a non-negative number, got {item.strip()}.")
        values.append(lam)
    if len(set(values)) != len(values):
        raise UsageError(f"$lam {text} lists a value twice; give each λ once.")
    return values


def check_sweep(args: TrainNextArgs) -> None:
    """Several λ: each trains from the same checkpoint and is judged on $eval_data; per-run state files do not apply."""
    if not args.eval_data:
        raise UsageError(
            "Several $lam values need $eval_data to compare them (e.g. the old task and the new one's test split)."
        )
    for name, value in (
        ("checkpoint_every", args.checkpoint_every),
        ("resume", args.resume),
        ("si_out", args.si_out),
        ("log_json", args.log_json),
        ("state_file", args.state_file),
    ):
        if value:
            raise UsageError(f"${name} applies to one run; give one $lam value with it, or drop ${name}.")


def lambda_text(lam: float) -> str:
    """λ as written in names and tables: ``%g`` (1000, 1e+06 → 1e06) when that is exact, else the shortest exact form
    (0.10000001), so that two different λ never share a name."""
    short = f"{lam:g}"
    return (short if float(short) == lam else repr(float(lam))).replace("+", "")


def lambda_output(output: Path, lam: float) -> Path:
    """``b.safetensors`` and λ 1000 → ``b.lambda-1000.safetensors``."""
    name = output.name.removesuffix(".safetensors")
    return output.with_name(f"{name}.lambda-{lambda_text(lam)}.safetensors")


def _check_files(
    args: TrainNextArgs, specs, eval_specs, resuming: bool, outputs: list[tuple[Path, str]] | None = None
) -> None:
    """Every input and output of the command checked together (see ``FileRoles``); ``outputs``: those written instead
    of $output (a λ sweep's, each with its role)."""
    roles = FileRoles(force=args.force or resuming)
    roles.input(args.checkpoint, "the checkpoint")
    roles.input(
        args.importance or (None if args.penalty == "none" else default_sidecar_path(args.checkpoint)),
        "$importance" if args.importance else "the importance file beside the checkpoint",
    )
    roles.input(args.mask, "$mask")
    roles.input(args.config, "$config")
    for field, field_specs in (("data", specs), ("eval_data", eval_specs)):
        for path in local_paths(field_specs):
            roles.input(path, f"${field}")
    for path, role in outputs or [(args.output, "$output")]:
        roles.output(path, role)
    roles.output(args.plot, "$plot")
    roles.output(args.si_out, "$si_out")
    roles.output(args.log_json, "$log_json")
    if args.checkpoint_every or args.resume:
        roles.output(args.state_path, "$state_file" if args.state_file else "the resume state", may_exist=True)
    roles.check()
    if args.state_path.exists() and args.checkpoint_every and not args.resume:
        raise OutputError(
            f"A resumable state {args.state_path} exists from an earlier run; pass $resume to continue it or delete it."
        )


def _penalty(args: TrainNextArgs, out: Output, ckpt, named: dict[str, Any], grown: list[str]):
    """(QuadraticPenalty or None, sidecar path or None, Sidecar or None, lineage use or None, λ): the penalty of this run."""
    path = args.importance or (None if args.penalty == "none" else default_sidecar_path(args.checkpoint))
    if path is None:
        return None, None, None, None, args.lam
    if not path.exists():
        if args.importance is not None:
            raise BadInputError(
                f"$importance {args.importance} does not exist; compute it with `cl-tool importance {args.checkpoint} --data ...`."
            )
        if args.lam:
            raise BadInputError(
                f"$lam was given but there is no importance file {path} beside {args.checkpoint}; compute it with "
                f"`cl-tool importance` or pass $importance FILE."
            )
        out.log(f"No importance file {path}: training without a penalty (first task).")
        return None, None, None, None, args.lam
    sc = load_sidecar(path)
    use = check_sidecar(
        sc, ckpt, str(args.checkpoint), fingerprint=ckpt.fingerprint
    )  # the anchor's own Ω, or an ancestor's (else exit 4)
    if use.note:
        out.log(use.note)
    omegas = fit_rows(
        sc.tensors, named, set(grown) | use.grown
    )  # rows added by --grow-head (now or since that ancestor): Ω = 0
    sc.tensors.update({k: v for k, v in omegas.items() if v is not None})
    check_covers(sc, named, str(args.checkpoint))
    lam = DEFAULT_LAMBDA if args.lam is None else args.lam
    if args.penalty == "online-ewc" and sc.decay == 1.0:
        out.warn(
            "$penalty online-ewc with an importance file accumulated without $decay: this is plain EWC on summed importances."
        )
    pen = QuadraticPenalty(
        args.penalty, list(named.values()), [p.detach() for p in named.values()], [omegas[n] for n in named], lam
    )
    if lam * pen.omega_max() > FLOAT32_MAX:
        raise UsageError(
            f"$lam {lam:g} times the largest importance {pen.omega_max():.3g} overflows float32; use a smaller $lam."
        )
    bound = divergence_bound(pen.omega_max(), lam, args.lr)
    if args.penalty in ("ewc", "online-ewc") and bound >= 2:
        out.warn(
            f"η·λ·max Ω = {bound:.3g} ≥ 2: plain EWC can diverge (it does under SGD); consider $penalty stabilized or a lower $lam/$lr."
        )
    return pen, path, sc, use, lam


def _match_training_classes(args: TrainNextArgs, out: Output, ckpt, task) -> list[str | None] | None:
    """Map the training task's labels to the model's rows by class name; names the model lacks take unnamed rows
    (or, with ``--grow-head``, new ones). Returns the row names the output records (None: none known)."""
    from cl_tool.data.classes import match_classes, present_ids

    raw = task._raw_labels
    cmap = match_classes(
        task.class_names,
        present_ids(raw) if raw is not None else None,
        ckpt.spec.class_names,
        ckpt.spec.num_classes,
        what=f"$data {task.spec.source}",
        assign=True,
        grow=args.grow_head,
    )
    task.map_classes(cmap.lookup)
    if cmap.assigned and ckpt.spec.class_names is not None and any(n is not None for n in ckpt.spec.class_names):
        rows = [cmap.names.index(n) for n in cmap.assigned]
        out.log(
            f"$data {task.spec.source}: new class{'es' if len(rows) > 1 else ''} "
            f"{', '.join(repr(n) for n in cmap.assigned[:8])}{' …' if len(rows) > 8 else ''} "
            f"take{'s' if len(rows) == 1 else ''} output row{'s' if len(rows) > 1 else ''} "
            f"{', '.join(map(str, rows[:8]))}{' …' if len(rows) > 8 else ''}."
        )
    return cmap.names


def _final_eval(result, last: dict[str, Any], eval_tasks: list, task) -> list[dict[str, Any]]:
    """The written model's eval-mode figures: on each ``--eval-data`` task (the last epoch's evaluations, made after the
    BatchNorm statistics were settled), else on the training data (at most TRAIN_EVAL_SAMPLES samples, evenly spaced)."""
    if eval_tasks:
        return [
            {
                "on": t.spec.name,
                "data": "eval-data",
                "samples": t.num_samples,
                "accuracy": last.get(f"eval/{t.spec.name}/accuracy"),
                "loss": last.get(f"eval/{t.spec.name}/loss"),
            }
            for t in eval_tasks
        ]
    if result.train_eval is None:
        return []
    return [{"on": task.spec.name, "data": "train", "of": task.num_samples, **result.train_eval}]


def _final_text(final_eval: list[dict[str, Any]], bn: dict[str, Any] | None) -> str:
    """The log's words for :func:`_final_eval` and the BatchNorm statistics (see ``training.bn_stats_record``)."""
    parts = []
    for e in final_eval:
        if e["data"] == "train":
            of = f" of {e['of']:,}" if e.get("of") is not None else ""
            parts.append(f"{e['accuracy']:.4f} on {e['samples']:,}{of} training samples")
        elif e["accuracy"] is not None:
            n = f" ({e['samples']:,} samples)" if e.get("samples") is not None else ""
            parts.append(f"{e['accuracy']:.4f} on {e['on']}{n}")
    text = f"eval-mode acc of the written model {', '.join(parts)}" if parts else "no eval-mode figure"
    if bn is None:
        return text
    if bn["method"] == "recomputed":
        return f"{text}; BatchNorm statistics re-estimated over {bn['samples']:,} samples with the final weights"
    if bn["method"] == "kept":
        return f"{text}; BatchNorm statistics kept from training ($bn_stats keep)"
    return f"{text}; BatchNorm statistics frozen ($freeze_bn_stats)"


def run_train_next(args: TrainNextArgs, out: Output) -> dict[str, Any]:
    """Train ``args.checkpoint`` on ``args.data`` under the penalty; write the checkpoint (and SI sidecar, log) or nothing."""

    (spec,) = task_specs(args.data, args.data_options)
    eval_specs = task_specs(args.eval_data, args.data_options, "eval_data", role="eval")
    if eval_specs:  # the per-epoch figures (and a λ table) are keyed by each task's name
        check_unique_names(eval_specs)
    runs = sweep_runs(args, eval_specs)
    resuming = args.resume and args.state_path.exists()
    _check_files(
        args,
        [spec],
        eval_specs,
        resuming,
        outputs=[(r.output, f"the λ={lambda_text(r.lam)} output") for r in runs] if runs else None,
    )
    if args.plot is not None:
        plots.require_matplotlib()  # before training, not after it
    if args.resume and not resuming:
        out.log(f"$resume: no resumable state at {args.state_path}; starting from the beginning.")

    dist, device = distributed.setup(args.device)
    keep_freed_memory()
    set_cuda_precision(device)
    if args.deterministic:
        set_deterministic(device)
    tasks: list = []
    try:
        if runs:
            return _sweep(args, runs, out, spec, eval_specs, dist, device, tasks)
        runtime.seed_everything(args.seed)
        ckpt, model = load_model(args.checkpoint)
        args.augmentation, note = small_input_augment(args.augmentation, ckpt.spec.input_shape)
        if note:
            out.log(note)
        return _train_next(args, out, spec, eval_specs, resuming, dist, device, ckpt, model, tasks)
    except RuntimeError as exc:
        err = deterministic_error(exc)
        if err is None:
            raise
        raise err from None
    finally:
        for t in tasks:
            t.close()
            if t.cache_note:
                out.log(t.cache_note)


def _fit_head(args: TrainNextArgs, out: Output, spec, ckpt, model, task):
    """(model, grown tensor names): the training labels checked against the model's classes, the classifier grown for
    new ones (``--grow-head``) and the class names the output records."""
    names = _match_training_classes(args, out, ckpt, task)
    labels = task.labels  # None for a stream: checked batch by batch
    if labels is not None and len(labels) and int(labels.min()) < 0:
        raise IncompatibleError(
            f"$data {spec.source} has negative label {int(labels.min())}; labels must be class ids 0..C-1."
        )
    classes_in_data = int(labels.max()) + 1 if labels is not None and len(labels) else ckpt.spec.num_classes
    classes_in_data = max(classes_in_data, len(names) if names is not None else 0)
    if labels is None:
        check_labels(task, max(ckpt.spec.num_classes, classes_in_data))
    grown: list[str] = []
    if classes_in_data > ckpt.spec.num_classes:
        if not args.grow_head:
            raise IncompatibleError(
                f"$data {spec.source} has label {classes_in_data - 1}, outside the model's {ckpt.spec.num_classes} classes "
                f"(0..{ckpt.spec.num_classes - 1}); pass $grow_head to add output rows."
            )
        model, grown = grow_classifier(ckpt, classes_in_data)
        out.log(
            f"Grew the classifier to {classes_in_data} classes ({', '.join(grown)}); the new rows have importance 0."
        )
    if names is not None:  # the output records which class each row stands for
        ckpt.spec.class_names = names + [None] * (ckpt.spec.num_classes - len(names))
    return model, grown


def _batchnorm_notes(args: TrainNextArgs, out: Output, model, penalty_used: str, dist, device) -> None:
    """Say that the penalty does not protect BatchNorm statistics, and what data-parallel training does to them."""
    import torch  # not at the top: `cl-tool --help` imports no torch

    if (
        penalty_used != "none"
        and not args.freeze_bn_stats
        and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ):
        out.log(
            "The model has BatchNorm running statistics, which the penalty does not protect; $freeze_bn_stats keeps them fixed."
        )
    bn_note = distributed.batchnorm_note(model, dist.world, device, args.freeze_bn_stats)
    if bn_note and dist.is_main:
        out.warn(bn_note)


def _epoch_logger(out: Output, dist, log_file):
    """(write_log(records), on_epoch(record)): the per-epoch records to $log_json and one log line per epoch."""

    def write_log(records: list[dict[str, Any]]) -> None:
        for rec in records:
            if log_file is not None:
                log_file.write_line(json.dumps(rec))

    def on_epoch(rec: dict[str, Any]) -> None:
        write_log([rec])
        if dist.is_main:
            evals = " ".join(
                f"{k.split('/')[1]}={v:.4f}"
                for k, v in rec.items()
                if k.startswith("eval/") and k.endswith("/accuracy")
            )
            out.log(
                f"epoch {rec['epoch']}: loss {rec['loss']:.4f} (task {rec['task_loss']:.4f} + penalty {rec['penalty']:.4g}), "
                f"train acc {rec['train_accuracy']:.4f}, lr {rec['lr']:.3g}, {rec['samples_per_s']:.0f} samples/s"
                f"{(' | eval ' + evals) if evals else ''}"
            )

    return write_log, on_epoch


def _finite_results(model, si, result, pen):
    """(state, SI importances or None) on the CPU; DivergedError if either holds NaN or ±Inf."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = first_nonfinite(state)
    if bad is not None:
        raise DivergedError(
            f"Training ended with NaN or infinite values in {bad!r} after step {result.steps}; "
            f"nothing was written; lower $lr{' or $lam' if pen is not None and pen.active else ''}."
        )
    if si is None:
        return state, None
    omega = {k: v.detach().float().cpu() for k, v in si.omega(check=False).items()}
    bad = first_nonfinite(omega)
    if bad is not None:
        raise DivergedError(
            f"The SI importance of {bad!r} is NaN or infinite after step {result.steps}; nothing was written; "
            f"lower $lr or raise $si_xi."
        )
    return state, omega


def _history_entry(args: TrainNextArgs, task, run: dict[str, Any], result, anchor_fp: str, grown: list[str]):
    """The ``train-next`` entry the output's history gains (``run``: penalty, λ, importance file and lineage)."""
    return history_entry(
        "train-next",
        argv=command_line(),
        data=task.describe(),
        penalty=run["penalty"],
        **{"lambda": run["lambda"]},
        importance=run["importance"],
        importance_tasks=run["importance_tasks"],
        **run["lineage"],
        optimizer=args.optimizer,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        augment=args.augmentation.describe() if args.augmentation.kind else None,
        freeze_bn_stats=args.freeze_bn_stats or None,
        bn_stats=result.bn_stats,
        anchor_fingerprint=anchor_fp,
        grown=grown or None,
        mask=str(args.mask) if args.mask else None,
    )


def _write_si(args: TrainNextArgs, task, omega: dict[str, Any], fp: str, force: bool) -> None:
    """$si_out: the SI importances of the written checkpoint (fingerprint ``fp``)."""
    task_rec = {
        "method": "si",
        "data": task.describe(),
        "checkpoint": str(args.output),
        "fingerprint": fp,
        "xi": args.si_xi,
    }
    sidecar = Sidecar(
        tensors=omega, method="si", options={"xi": args.si_xi}, data=task.describe(), fingerprint=fp, tasks=[task_rec]
    )
    save_sidecar(args.si_out, sidecar, force=force)


def _resume_state(args: TrainNextArgs, cfg, spec, penalty_used: str, lam, dist, anchor_fp: str):
    """The resumable state of this run (None without $checkpoint_every and $resume); it records every option that
    changes a step, so that a resume with other options is refused."""
    if not (args.checkpoint_every or args.resume):
        return None
    run_cfg = {
        **{k: v for k, v in vars(cfg).items() if k not in ("eval_batch_size", "bn_stats")},  # neither changes a step
        "penalty": penalty_used,
        "lambda": lam,
        "data": spec.describe(),
        "world": dist.world,
        **({"augment": args.augmentation.describe()} if args.augmentation.kind else {}),
    }
    return ResumeState(args.state_path, fingerprint=anchor_fp, config=run_cfg)


def _write_outputs(
    args, task, ckpt, model, state, omega, hist, log_file, result_doc, resuming: bool, published
) -> None:
    """The checkpoint (and $si_out), all or nothing together with $log_json; their fingerprint and paths go to
    ``result_doc``; ``published(path)`` is told of the checkpoint as soon as it is in place."""
    with all_or_nothing(log_file) as wrote:
        fp = checkpoint.save_checkpoint(
            args.output,
            ckpt.spec,
            state,
            hist,
            extra=dict(ckpt.extra),
            force=args.force or resuming,
            layout=model_layout(model),
        )
        wrote(args.output)
        if published is not None:
            published(args.output)
        result_doc["fingerprint"] = fp
        if omega is not None:
            _write_si(args, task, omega, fp, force=args.force or resuming)
            wrote(args.si_out)
            result_doc["si_out"] = str(args.si_out)


def _train_next(
    args: TrainNextArgs,
    out: Output,
    spec,
    eval_specs,
    resuming: bool,
    dist,
    device,
    ckpt,
    model,
    tasks: list,
    published=None,
) -> dict[str, Any]:
    """The part of run_train_next that holds open tasks (closed by the caller); ``published(path)`` is called as soon as
    the output is in place (a λ sweep removes it again if a later run fails)."""
    from cl_tool.importance import SIAccumulator  # not at the top: it imports torch (`cl-tool --help` must not)

    anchor_fp = ckpt.fingerprint
    check_augment_fits(args.augmentation, ckpt.spec.input_shape)
    if not tasks:  # a λ sweep passes the tasks it opened once
        tasks += open_tasks([spec], ckpt.spec, args.data_options, log=out.log)
    task = tasks[0]
    model, grown = _fit_head(args, out, spec, ckpt, model, task)
    if len(tasks) == 1:
        tasks += open_tasks(eval_specs, ckpt.spec, args.data_options, log=out.log, match=True)
    eval_tasks = tasks[1:]
    model.to(device)
    named = trainable_parameters(model)
    pen, sidecar_path, sc, use, lam = _penalty(args, out, ckpt, named, grown)
    penalty_used = args.penalty if pen is not None and pen.active else "none"
    _batchnorm_notes(args, out, model, penalty_used, dist, device)
    si = SIAccumulator(named, xi=args.si_xi) if args.si_out is not None else None
    masks = load_mask(args.mask, named) if args.mask is not None else None

    cfg = args.train_config()
    state_io = _resume_state(args, cfg, spec, penalty_used, lam, dist, anchor_fp)
    log_file = (
        LineFile(args.log_json, force=args.force or resuming) if args.log_json is not None and dist.is_main else None
    )
    write_log, on_epoch = _epoch_logger(out, dist, log_file)

    try:
        n = task.num_samples
        with out.progress(
            f"training on {spec.name}", math.ceil(n / args.batch_size) * args.epochs if dist.is_main and n else None
        ) as bar:
            result = train(
                model,
                task,
                cfg,
                device=device,
                penalty=pen,
                si=si,
                masks=masks,
                augment=args.augmentation,
                eval_sets=[(t.spec.name, t) for t in eval_tasks],
                log=on_epoch,
                on_restore=write_log,
                state_io=state_io,
                dist=dist,
                progress=bar.advance if dist.is_main else None,
                started_at=started_at(),
                train_eval_limit=None if eval_tasks else TRAIN_EVAL_SAMPLES,
            )
        state, omega = _finite_results(model, si, result, pen)
    except BaseException as exc:
        if log_file is not None:
            log_file.discard(exc)
        if isinstance(exc, DivergedError) and state_io is not None and dist.is_main:
            state_io.remove()  # resuming would only diverge again
        raise

    lineage = {
        "importance_fingerprint": use.fingerprint if use else None,
        "importance_generations": use.generations if use else None,
    }
    last = result.epochs[-1] if result.epochs else {}
    final_eval = _final_eval(result, last, eval_tasks, task)
    result_doc: dict[str, Any] = {
        "output": str(args.output),
        "penalty": penalty_used,
        "lambda": lam if penalty_used != "none" else None,
        "importance": str(sidecar_path) if sidecar_path else None,
        **lineage,
        "epochs": result.epochs,
        "final_train_accuracy": last.get("train_accuracy"),
        "final_eval": final_eval,
        "bn_stats": result.bn_stats,
        "steps": result.steps,
        "samples": task.num_samples,
        "data": task.describe(),
        "eval_data": [t.describe() for t in eval_tasks],
        "setup_seconds": round(result.setup_seconds or 0.0, 3),
        "train_seconds": round(result.train_seconds, 3),
        "samples_per_s": round(result.samples_per_s, 1),
    }
    if dist.is_main:
        run = {
            "penalty": penalty_used,
            "lambda": result_doc["lambda"],
            "importance": result_doc["importance"],
            "importance_tasks": len(sc.tasks) if sc is not None and penalty_used != "none" else None,
            "lineage": lineage,
        }
        hist = ckpt.history + [_history_entry(args, task, run, result, anchor_fp, grown)]
        _write_outputs(args, task, ckpt, model, state, omega, hist, log_file, result_doc, resuming, published)
        if state_io is not None:
            state_io.remove()
        out.log(
            f"Wrote {args.output}: {result.steps} steps in {result.train_seconds:.1f} s of training ({result.samples_per_s:,.0f} samples/s) "
            f"after {result.setup_seconds or 0.0:.1f} s of set-up (imports, model, data); penalty {penalty_used}"
            f"{f', λ={lam:g}' if penalty_used != 'none' else ''}; final train acc {last.get('train_accuracy', float('nan')):.4f} "
            f"(train mode, over the last epoch); {_final_text(final_eval, result.bn_stats)}."
        )
        out.result(result_doc)
    distributed.barrier()
    return result_doc


def sweep_runs(args: TrainNextArgs, eval_specs) -> list[TrainNextArgs]:
    """The arguments of each run of a λ sweep (one λ, output ``OUT.lambda-λ.safetensors``, no plot); [] for one λ."""
    if len(args.lambdas) < 2:
        return []
    return [
        dataclasses.replace(args, lam=repr(lam), plot=None, output=lambda_output(args.output, lam))
        for lam in args.lambdas
    ]


def _sweep(args: TrainNextArgs, runs, out: Output, spec, eval_specs, dist, device, tasks: list) -> dict[str, Any]:
    """One run per λ from the same checkpoint and seed, on tasks opened (decoded) once by the first run: all outputs
    and the plot, or none of them."""
    inner = Output(json=False, quiet=out.quiet, name_of=out.name_of)
    docs = []
    with all_or_nothing() as wrote:
        for run in runs:
            runtime.seed_everything(run.seed)  # each run is the command with that one λ
            ckpt, model = load_model(run.checkpoint)
            run.augmentation, note = small_input_augment(run.augmentation, ckpt.spec.input_shape)
            if note and not docs:
                out.log(note)
            out.log(f"λ = {lambda_text(run.lam)}: training {run.output}")
            docs.append(
                _train_next(run, inner, spec, eval_specs, False, dist, device, ckpt, model, tasks, published=wrote)
            )
        names = [t.spec.name for t in tasks[1:]]
        rows = sweep_rows(args.lambdas, docs, names)
        if args.plot is not None and dist.is_main:
            plots.plot_lambda_sweep(
                args.lambdas,
                {n: [r["accuracy"][n] for r in rows] for n in names},
                args.plot,
                title=f"{Path(str(args.checkpoint)).name} trained on {tasks[0].spec.name}: accuracy vs λ ({args.penalty})",
                force=args.force,
            )
            wrote(args.plot)
    best = best_row(rows)
    out.table(
        "eval accuracy after training, per λ (best: highest mean; ties: the smaller λ)",
        ["λ", *names, "mean", "output"],
        [
            [
                lambda_text(r["lambda"]),
                *[r["accuracy"][n] for n in names],
                r["mean"],
                r["output"] + (" (best)" if r is best else ""),
            ]
            for r in rows
        ],
    )
    return out.result(
        {
            "runs": rows,
            "best": {"lambda": best["lambda"], "output": best["output"], "criterion": "mean eval accuracy"},
            "plot": str(args.plot) if args.plot is not None else None,
        }
    )


def sweep_rows(lambdas: list[float], docs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One row per λ: the written model's accuracy on each eval task (``final_eval``) and their mean over the tasks
    measured (None when none was)."""
    rows = []
    for lam, doc in zip(lambdas, docs):
        found = {e["on"]: e["accuracy"] for e in doc["final_eval"] if e["data"] == "eval-data"}
        accs = [found.get(n) for n in names]
        known = [a for a in accs if a is not None and math.isfinite(a)]
        rows.append(
            {
                "lambda": lam,
                "output": doc["output"],
                "accuracy": dict(zip(names, accs)),
                "mean": sum(known) / len(known) if known else None,
                "fingerprint": doc.get("fingerprint"),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the highest mean eval accuracy; ties (and rows without a mean) go to the smaller λ."""
    return max(rows, key=lambda r: (r["mean"] if r["mean"] is not None else -math.inf, -r["lambda"]))
