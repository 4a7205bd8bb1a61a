"""What ``cl-tool train-next`` does, separated from option parsing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cl_tool.errors import BadInputError, DivergedError, IncompatibleError, OutputError, UsageError
from cl_tool.output import Progress, emit_json, log, warn

DEFAULT_LAMBDA = 100.0


@dataclass
class TrainNextArgs:
    checkpoint: Path
    data: list[str]
    output: Path
    penalty: str = "stabilized"
    lam: Optional[float] = None
    importance: Optional[Path] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    freeze_bn_stats: bool = False
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    deterministic: bool = False
    si_out: Optional[Path] = None
    si_xi: float = 0.1
    mask: Optional[Path] = None
    grow_head: bool = False
    eval_data: list[str] = field(default_factory=list)
    log_json: Optional[Path] = None
    checkpoint_every: int = 0
    resume: bool = False
    state_file: Optional[Path] = None
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


def _validate(a: TrainNextArgs) -> None:
    from cl_tool.penalty import PENALTIES
    from cl_tool.training import TrainConfig

    if a.penalty not in PENALTIES:
        raise UsageError(f"--penalty {a.penalty} is unknown; use one of {', '.join(PENALTIES)}.")
    if a.lam is not None and not (a.lam >= 0 and math.isfinite(a.lam)):
        raise UsageError(f"--lambda must be a non-negative number, got {a.lam}.")
    if a.penalty == "none" and a.importance is not None:
        raise UsageError("--penalty none and --importance contradict each other; drop one.")
    if a.penalty == "none" and a.lam:
        raise UsageError("--penalty none and --lambda contradict each other; drop one.")
    if not a.si_xi > 0:
        raise UsageError(f"--si-xi must be positive, got {a.si_xi}.")
    if a.resume and not (a.checkpoint_every or a.state_file):
        pass  # --resume alone uses the default state path
    if len(a.data) != 1:
        raise UsageError(f"train-next takes exactly one --data (got {len(a.data)}); train tasks one after another.")
    TrainConfig(**_train_config_kwargs(a)).validate()


def _train_config_kwargs(a: TrainNextArgs) -> dict[str, Any]:
    return dict(optimizer=a.optimizer, lr=a.lr, momentum=a.momentum, nesterov=a.nesterov, weight_decay=a.weight_decay, epochs=a.epochs,
                batch_size=a.batch_size, seed=a.seed, schedule=a.schedule, warmup_steps=a.warmup_steps, grad_clip=a.grad_clip,
                precision=a.precision, checkpoint_every=a.checkpoint_every, freeze_bn_stats=a.freeze_bn_stats)


def default_state_path(output: Path) -> Path:
    name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(name + ".resume.safetensors")


def grow_classifier(ckpt, new_classes: int):
    """Rebuild ``ckpt``'s model with ``new_classes`` outputs, copying every old tensor (old rows of the head)."""
    import torch

    from cl_tool.models import build_model

    spec = ckpt.spec
    if spec.arch == "mlp" and "sizes" in spec.kwargs:
        sizes = [int(s) for s in str(spec.kwargs["sizes"]).split(",")]
        sizes[-1] = new_classes
        spec.kwargs["sizes"] = ",".join(map(str, sizes))
    spec.num_classes = new_classes
    model = build_model(spec)
    new_state = model.state_dict()
    grown = []
    for name, old in ckpt.state.items():
        new = new_state[name]
        if tuple(new.shape) == tuple(old.shape):
            new_state[name] = old
        elif new.ndim == old.ndim and new.shape[1:] == old.shape[1:] and new.shape[0] > old.shape[0]:
            t = new.clone()
            t[: old.shape[0]] = old
            new_state[name] = t
            grown.append(name)
        else:
            raise IncompatibleError(f"--grow-head cannot map tensor {name!r} from {list(old.shape)} to {list(new.shape)}.")
    model.load_state_dict(new_state)
    ckpt.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, grown


def run_train_next(a: TrainNextArgs) -> dict[str, Any]:
    import torch

    from cl_tool import distributed
    from cl_tool.atomic import FileRoles, LineFile, all_or_nothing
    from cl_tool.checkpoint import first_nonfinite, save_checkpoint
    from cl_tool.cli._common import FLOAT32_MAX, argv_text, data_specs, history_entry, seed_everything
    from cl_tool.penalty import QuadraticPenalty, divergence_bound
    from cl_tool.lineage import check_sidecar, fit_rows
    from cl_tool.sidecar import Sidecar, check_covers, default_sidecar_path, load_sidecar, save_sidecar
    from cl_tool.training import ResumeState, TrainConfig, train
    from cl_tool.workflows.common import load_model, load_tasks, register_data, trainable

    _validate(a)
    spec = data_specs(a.data, split=a.split, image_column=a.image_column, label_column=a.label_column, permute=a.permute,
                      rotate=a.rotate, invert=a.invert, limit=a.limit)[0]
    eval_specs = data_specs(a.eval_data) if a.eval_data else []
    state_path = a.state_file or default_state_path(a.output)
    resuming = a.resume and state_path.exists()
    roles = FileRoles(force=a.force or resuming)
    roles.input(a.checkpoint, "the checkpoint")
    roles.input(a.importance or (None if a.penalty == "none" else default_sidecar_path(a.checkpoint)),
                "--importance" if a.importance else "the importance file beside the checkpoint")
    roles.input(a.mask, "--mask")
    roles.input(a.config, "--config")
    register_data(roles, [spec], "--data")
    register_data(roles, eval_specs, "--eval-data")
    roles.output(a.output, "--output")
    roles.output(a.si_out, "--si-out")
    roles.output(a.log_json, "--log-json")
    if a.checkpoint_every or a.resume:
        roles.output(state_path, "--state-file" if a.state_file else "the resume state", may_exist=True)
    roles.check()
    if state_path.exists() and a.checkpoint_every and not a.resume:
        raise OutputError(f"A resumable state {state_path} exists from an earlier run; pass --resume to continue it or delete it.")
    if a.resume and not resuming:
        log(f"--resume: no resumable state at {state_path}; starting from the beginning.")

    dist, device = distributed.setup(a.device)
    if a.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(a.seed)
    ckpt, model = load_model(a.checkpoint)
    anchor_fp = ckpt.fingerprint
    (task,) = load_tasks([spec], ckpt.spec)
    n_classes_data = int(task.y.max()) + 1
    if int(task.y.min()) < 0:
        raise IncompatibleError(f"--data {spec.source} has negative label {int(task.y.min())}; labels must be class ids 0..C-1.")
    grown: list[str] = []
    if n_classes_data > ckpt.spec.num_classes:
        if not a.grow_head:
            raise IncompatibleError(
                f"--data {spec.source} has label {n_classes_data - 1}, outside the model's {ckpt.spec.num_classes} classes (0..{ckpt.spec.num_classes - 1}); "
                f"pass --grow-head to add output rows."
            )
        model, grown = grow_classifier(ckpt, n_classes_data)
        log(f"Grew the classifier to {n_classes_data} classes ({', '.join(grown)}); the new rows have importance 0.")
    eval_tasks = load_tasks(eval_specs, ckpt.spec, num_classes=ckpt.spec.num_classes, what="--eval-data")
    model.to(device)
    named = trainable(model)

    # ----- the penalty: find and check the importance sidecar -----
    sidecar_path = a.importance or (None if a.penalty == "none" else default_sidecar_path(a.checkpoint))
    pen = None
    sc = None
    use = None
    lam = a.lam
    if sidecar_path is not None:
        if not sidecar_path.exists():
            if a.importance is not None:
                raise BadInputError(f"--importance {a.importance} does not exist; compute it with `cl-tool importance {a.checkpoint} --data ...`.")
            if a.lam:
                raise BadInputError(f"--lambda was given but there is no importance file {sidecar_path} beside {a.checkpoint}; compute it with `cl-tool importance` or pass --importance FILE.")
            log(f"No importance file {sidecar_path}: training without a penalty (first task).")
            sidecar_path = None
        else:
            sc = load_sidecar(sidecar_path)
            use = check_sidecar(sc, ckpt, str(a.checkpoint), fingerprint=anchor_fp)  # the anchor's own Ω, or a recorded ancestor's (exit 4 otherwise)
            if use.note:
                log(use.note)
            omegas = fit_rows(sc.tensors, named, set(grown) | use.grown)  # rows added by --grow-head (now or since that ancestor): Ω = 0
            sc.tensors.update({k: v for k, v in omegas.items() if v is not None})
            check_covers(sc, named, str(a.checkpoint))
            lam = DEFAULT_LAMBDA if lam is None else lam
            if a.penalty == "online-ewc" and sc.decay == 1.0:
                warn("--penalty online-ewc with an importance file accumulated without --decay: this is plain EWC on summed importances.")
            pen = QuadraticPenalty(a.penalty, list(named.values()), [p.detach() for p in named.values()],
                                   [omegas[n] for n in named], lam)
            if lam * pen.omega_max() > FLOAT32_MAX:
                raise UsageError(f"--lambda {lam:g} times the largest importance {pen.omega_max():.3g} overflows float32; use a smaller --lambda.")
            bound = divergence_bound(pen.omega_max(), lam, a.lr)
            if a.penalty in ("ewc", "online-ewc") and bound >= 2:
                warn(f"η·λ·max Ω = {bound:.3g} ≥ 2: plain EWC can diverge (it does under SGD); consider --penalty stabilized or a lower --lambda/--lr.")
    penalty_used = a.penalty if pen is not None and pen.active else "none"
    if penalty_used != "none" and not a.freeze_bn_stats and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        log("The model has BatchNorm running statistics, which the penalty does not protect; --freeze-bn-stats keeps them fixed.")

    si = None
    if a.si_out is not None:
        from cl_tool.importance import SIAccumulator

        si = SIAccumulator(named, xi=a.si_xi)
    masks = None
    if a.mask is not None:
        masks = load_mask(a.mask, named)

    cfg = TrainConfig(**_train_config_kwargs(a))
    run_cfg = {**_train_config_kwargs(a), "penalty": penalty_used, "lambda": lam, "data": spec.describe(), "world": dist.world}
    state_io = ResumeState(state_path, fingerprint=anchor_fp, config=run_cfg) if (a.checkpoint_every or a.resume) else None
    log_file = LineFile(a.log_json, force=a.force or resuming) if a.log_json is not None and dist.is_main else None

    def write_log(records: list[dict[str, Any]]) -> None:
        for rec in records:
            if log_file is not None:
                log_file.write_line(json.dumps(rec))

    def on_epoch(rec: dict[str, Any]) -> None:
        write_log([rec])
        if dist.is_main:
            evals = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in rec.items() if k.startswith("eval/") and k.endswith("/accuracy"))
            log(f"epoch {rec['epoch']}: loss {rec['loss']:.4f} (task {rec['task_loss']:.4f} + penalty {rec['penalty']:.4g}), "
                f"train acc {rec['train_accuracy']:.4f}, lr {rec['lr']:.3g}, {rec['samples_per_s']:.0f} samples/s{(' | eval ' + evals) if evals else ''}")

    steps = math.ceil(len(task) / a.batch_size) * a.epochs
    try:
        with Progress(f"training on {spec.name}", steps if dist.is_main else None) as bar:
            result = train(model, task.x, task.y, cfg, device=device, penalty=pen, si=si, masks=masks,
                           eval_sets=[(t.spec.name, t.x, t.y) for t in eval_tasks], log=on_epoch, on_restore=write_log,
                           state_io=state_io, dist=dist, progress=bar.advance if dist.is_main else None)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        bad = first_nonfinite(state)
        if bad is not None:
            raise DivergedError(f"Training ended with NaN or infinite values in {bad!r} after step {result.steps}; "
                                f"nothing was written; lower --lr{' or --lambda' if pen is not None and pen.active else ''}.")
        omega = None
        if si is not None:
            omega = {k: v.detach().float().cpu() for k, v in si.omega(check=False).items()}
            bad = first_nonfinite(omega)
            if bad is not None:
                raise DivergedError(f"The SI importance of {bad!r} is NaN or infinite after step {result.steps}; nothing was written; "
                                    f"lower --lr or raise --si-xi.")
    except BaseException as exc:
        if log_file is not None:
            log_file.discard(exc)
        if isinstance(exc, DivergedError) and state_io is not None and dist.is_main:
            state_io.remove()  # resuming would only diverge again
        raise

    out: dict[str, Any] = {"output": str(a.output), "penalty": penalty_used, "lambda": lam if penalty_used != "none" else None,
                           "importance": str(sidecar_path) if sidecar_path else None,
                           "importance_fingerprint": use.fingerprint if use else None, "importance_generations": use.generations if use else None,
                           "epochs": result.epochs, "steps": result.steps,
                           "seconds": round(result.seconds, 3), "samples": len(task)}
    if dist.is_main:
        hist = ckpt.history + [history_entry("train-next", argv=argv_text(), data=task.describe(), penalty=penalty_used,
                                             **{"lambda": lam if penalty_used != "none" else None},
                                             importance=str(sidecar_path) if sidecar_path else None,
                                             importance_tasks=len(sc.tasks) if sc is not None and penalty_used != "none" else None,
                                             importance_fingerprint=use.fingerprint if use else None,
                                             importance_generations=use.generations if use else None,
                                             optimizer=a.optimizer, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed,
                                             freeze_bn_stats=a.freeze_bn_stats or None,
                                             anchor_fingerprint=anchor_fp, grown=grown or None, mask=str(a.mask) if a.mask else None)]
        extra = dict(ckpt.extra)
        from cl_tool.checkpoint import model_layout

        with all_or_nothing(log_file) as wrote:
            fp = save_checkpoint(a.output, ckpt.spec, state, hist, extra=extra, force=a.force or resuming, layout=model_layout(model))
            wrote(a.output)
            out["fingerprint"] = fp
            if omega is not None:
                task_rec = {"method": "si", "data": task.describe(), "checkpoint": str(a.output), "fingerprint": fp, "xi": a.si_xi}
                save_sidecar(a.si_out, Sidecar(tensors=omega, method="si", options={"xi": a.si_xi}, data=task.describe(), fingerprint=fp,
                                               tasks=[task_rec]), force=a.force or resuming)
                wrote(a.si_out)
                out["si_out"] = str(a.si_out)
        if state_io is not None:
            state_io.remove()
        last = result.epochs[-1] if result.epochs else {}
        log(f"Wrote {a.output} after {result.steps} steps in {result.seconds:.1f}s (penalty {penalty_used}"
            f"{f', λ={lam:g}' if penalty_used != 'none' else ''}); final train acc {last.get('train_accuracy', float('nan')):.4f}.")
        if a.json_out:
            emit_json(out)
    distributed.barrier()
    return out


def load_mask(path: Path, named: dict[str, Any]) -> dict[str, Any]:
    """Read a mask file written by ``prune --mask-out`` (1 = keep, 0 = pruned) and check it fits."""
    from cl_tool.safetensors_io import load_tensors

    tensors, meta = load_tensors(path, "Mask file")
    if meta.get("cl_tool.mask") != "1":
        raise BadInputError(f"--mask {path} is not a cl-tool mask file; write one with `cl-tool prune --mask-out`.")
    for name, m in tensors.items():
        if name not in named:
            raise IncompatibleError(f"--mask {path} has an entry for {name!r}, which the model does not have.")
        if tuple(m.shape) != tuple(named[name].shape):
            raise IncompatibleError(f"--mask {path}: {name!r} has shape {list(m.shape)}, the parameter {list(named[name].shape)}.")
    return {k: v.to(named[k].dtype) for k, v in tensors.items()}
