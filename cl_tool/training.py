"""The training loop behind ``train-next``: optimiser, schedule, penalty, AMP, guard, resume, DDP.

Learning rate η in force at global step t (0-based), with ``warmup`` steps and T total steps:
``constant``: η_t = η·min(1, (t+1)/warmup); ``cosine``: the same warm-up, then
η_t = η·½(1 + cos(π·(t − warmup)/(T − warmup))). The stabilized penalty uses η_t.

Data order: epoch e visits the samples in ``randperm(N)`` drawn from a generator seeded
with (seed, e) (``cl_tool.data.GlobalBatchSampler``), so a resumed run sees exactly the batches
an uninterrupted one would; augmentation is a function of (seed, epoch, sample) only, so this
holds with any number of data workers. Under torch.distributed each global batch of B samples
is split into world-size contiguous shares (sizes differing by at most one; a share may be empty);
rank r's loss is Σ_{i∈share r} ℓᵢ / (B/world), so DDP's gradient average Σ_r ∇loss_r / world is
the single-process mean gradient Σᵢ ∇ℓᵢ / B for any split (an empty share adds 0).

Host syncs: the step loop reads nothing from the device. The epoch's loss sum and correct
count stay on the device; a non-finite loss or gradient is recorded there (the first step it
happened) and read every :data:`FINITE_CHECK_EVERY` steps, before a resumable state is written
and at the end of every epoch, so a diverged run stops within that many steps naming the step
where it diverged.

BatchNorm statistics (``bn_stats="recompute"``, statistics not frozen): the running mean/variance
training leaves are an exponential moving average of batch statistics computed while the weights
moved, so they lag the final weights. After the last epoch's steps they are re-estimated with the
final weights (:func:`recompute_bn_stats`), before that epoch's evaluations, so every eval-mode
figure of the last epoch is of the model that is written. Under torch.distributed every rank makes
this pass over the whole task (not its share), so its statistics are those of one process.
The evaluations (``eval_sets``, the training-data figure) are sharded: each rank evaluates a share
of the rows and the sums are added over the ranks (``cl_tool.evaluation``).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cl_tool import distributed
from cl_tool.distributed import DistInfo, all_reduce_max, all_reduce_sum
from cl_tool.errors import DivergedError, Interrupted, UsageError
from cl_tool.evaluation import evaluate_slice, evaluate_task
from cl_tool.penalty import divergence_bound
from cl_tool.resume import restore_rng_states, rng_states
from cl_tool.runtime import autocast, skip_dynamo_import

OPTIMIZERS = ("adam", "adamw", "sgd")
FINITE_CHECK_EVERY = 32  # steps between reads of the divergence flags (each read waits for the device)
_NEVER = 2**62  # "no non-finite value yet" in the divergence flags
SCHEDULES = ("constant", "cosine")
BN_STATS = ("recompute", "keep")
TRAIN_EVAL_SAMPLES = 2000  # the eval-mode figure on the training data uses at most this many samples


@dataclass
class TrainConfig:
    """The options of a training run; their defaults are train-next's (its options are declared with these)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    precision: str = "fp32"
    checkpoint_every: int = 0
    eval_batch_size: int = 512
    freeze_bn_stats: bool = False
    bn_stats: str = "recompute"


def set_training_mode(model, freeze_bn_stats: bool) -> None:
    """``model.train()``; with ``freeze_bn_stats`` its BatchNorm layers stay in eval mode.

    Eval-mode BatchNorm normalises with its stored running mean/variance and does not update
    them. The penalty protects parameters only; the running statistics are buffers, and training
    on a new task otherwise moves them to the new data, which can undo the old task however
    large λ is. The affine weight and bias still train (and are penalised) either way.
    """
    from torch import nn  # torch is imported inside functions: `cl-tool --help` imports this module, not torch

    model.train()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def batchnorm_layers(model) -> list:
    """The model's BatchNorm modules that keep running statistics."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recompute_bn_stats(model, task, *, device, batch_size: int, precision: str = "fp32") -> dict[str, Any] | None:
    """Re-estimate every BatchNorm layer's running mean and variance over ``task`` with the model's current weights.

    ``torch.optim.swa_utils.update_bn``: the statistics are reset and momentum set to None, so after one pass in train
    mode (no gradients) over the K batches of every row in order (``batch_size`` per batch, never augmented) each
    layer holds the cumulative averages running_mean = (1/K) Σ_k μ_k and running_var = (1/K) Σ_k σ²_k of its batch
    means and unbiased batch variances; momentum is restored afterwards. Parameters are not touched. Returns
    {"layers", "samples", "batches", "batch_size"}, or None when the model has no BatchNorm layer with running
    statistics (nothing is done).
    """
    import torch
    from torch.optim.swa_utils import update_bn

    layers = batchnorm_layers(model)
    if not layers:
        return None
    counts = {"samples": 0, "batches": 0}

    def inputs():
        for batch in task.batches(batch_size=batch_size, device=device):
            counts["samples"] += int(batch.y.shape[0])
            counts["batches"] += 1
            yield batch.x

    with torch.no_grad(), autocast(device, precision):
        update_bn(inputs(), model)
    return {"layers": len(layers), **counts, "batch_size": batch_size}


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """η_t for global step ``step`` (see module docstring)."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine" and total_steps > warm:
        frac = min(1.0, (step - warm) / max(1, total_steps - warm))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr


def make_optimizer(cfg: TrainConfig, params):
    """The optimiser of ``cfg`` over ``params``, whose ``step`` runs without torch.compile's import (see :func:`_plain_step`)."""
    import torch

    skip_dynamo_import()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _plain_step(opt)


def _plain_step(opt):
    """Replace ``opt.step`` by the optimiser's own update under ``torch.no_grad()``.

    ``Optimizer.step`` is wrapped (step hooks, profiling, and a ``torch._dynamo.graph_break()``
    whose import costs seconds per process); cl-tool uses none of it and never compiles, so the
    innermost step (``__wrapped__``) is called in no-grad mode, as the wrapper would: same update.
    """
    import torch

    raw = type(opt).step
    while hasattr(raw, "__wrapped__"):
        raw = raw.__wrapped__

    def step(closure=None):
        with torch.no_grad():
            return raw(opt, closure)

    opt.step = step
    return opt


@dataclass
class TrainResult:
    """Steps taken, per-epoch records, and the time split: set-up (process start to the first step) and training
    (first step to last, each epoch's steps; evaluations between epochs excluded) over ``samples`` samples."""

    steps: int
    epochs: list[dict[str, Any]] = field(default_factory=list)
    setup_seconds: float | None = None
    train_seconds: float = 0.0
    samples: int = 0
    bn_stats: dict[str, Any] | None = None  # see bn_stats_record
    train_eval: dict[str, Any] | None = (
        None  # eval-mode accuracy/loss/samples on the training data after the last epoch
    )

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (restores handlers on exit)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _grads_finite(params):
    """A 0-d bool tensor: every gradient of ``params`` is finite (computed on the device, not read)."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()


def _note_first(first, i: int, ok, step: int) -> None:
    """``first[i] = step`` if ``ok`` is false and ``first[i]`` is not set yet (on the device, no read)."""
    first[i : i + 1].masked_fill_(~ok & (first[i] == _NEVER), step)


def train(
    model,
    task,
    cfg: TrainConfig,
    *,
    device,
    penalty=None,
    si=None,
    masks: dict[str, Any] | None = None,
    augment=None,
    eval_sets: list[tuple[str, Any]] = (),
    log: Callable[[dict[str, Any]], None] | None = None,
    on_restore: Callable[[list[dict[str, Any]]], None] | None = None,
    state_io=None,
    dist: DistInfo | None = None,
    progress=None,
    started_at: float | None = None,
    train_eval_limit: int | None = None,
) -> TrainResult:
    """Train ``model`` on ``task`` (a ``cl_tool.data.Task``) with cross-entropy + penalty; return per-epoch records.

    Batches come from ``task.batches`` in the order of the module docstring (``augment``: none,
    shift=K or timm); ``eval_sets`` are (name, Task) pairs evaluated after every epoch.

    After the last epoch's steps, BatchNorm statistics are re-estimated (module docstring; ``result.bn_stats``) and,
    when ``train_eval_limit`` is given, the model is evaluated in eval mode on that many training samples
    (:func:`cl_tool.evaluation.evaluate_slice`; ``result.train_eval`` and the last epoch's record).

    ``state_io`` (optional) has ``save(state: dict)`` and ``load() -> dict | None`` for resumable
    state (``on_restore`` receives the epoch records of a restored state); a state is saved every
    ``cfg.checkpoint_every`` steps and, when that is set, on SIGTERM/SIGINT; ``masks`` maps parameter names to {0,1} tensors kept applied after every step.
    Raises DivergedError on a non-finite loss/gradient, Interrupted on SIGTERM/SIGINT.
    """
    import torch
    import torch.nn.functional as F

    dist = dist or DistInfo()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    train_model, swapped = model, []
    if dist.world > 1:
        if device.type == "cuda" and not cfg.freeze_bn_stats:
            swapped = distributed.use_sync_batchnorm(model)
        train_model = distributed.wrap_ddp(model, device)
    opt = make_optimizer(cfg, params)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    n = task.num_samples  # None: a stream of unknown length
    if cfg.batch_size % dist.world:
        raise UsageError(f"$batch_size {cfg.batch_size} must be divisible by the number of processes ({dist.world}).")
    if n is None and (cfg.schedule == "cosine" or cfg.checkpoint_every):
        raise UsageError(
            f"{'$schedule cosine' if cfg.schedule == 'cosine' else '$checkpoint_every'} needs the number of samples, "
            f"which this stream does not say; give $limit N."
        )
    total_steps = math.ceil(n / cfg.batch_size) * cfg.epochs if n is not None else 0
    mask_list = [(p, masks[nm].to(device, p.dtype)) for nm, p in named if masks and nm in masks]

    result = TrainResult(steps=0)
    st = state_io.load() if state_io is not None else None
    start_epoch, start_batch, global_step = _restore(st, model, opt, scaler, si, device) if st else (0, 0, 0)
    if st:
        result.epochs = st.get("epochs", [])
        if on_restore is not None:
            on_restore(result.epochs)

    def snapshot(epoch: int, batch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batch": batch,
            "global_step": global_step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            **rng_states(device),
            "si": si.state_dict() if si is not None else None,
            "epochs": result.epochs,
        }

    # first step with a non-finite [loss, gradient], kept on the device and read by check_finite
    first_bad = torch.full((2,), _NEVER, dtype=torch.int64, device=device)

    def check_finite(epoch: int, collective: bool = True) -> None:
        """Raise DivergedError naming the first step whose loss or gradient was not finite (on any rank)."""
        if collective and dist.world > 1:
            distributed.all_reduce_min_(first_bad)
        loss_at, grad_at = first_bad.tolist()
        if min(loss_at, grad_at) < _NEVER:
            step = min(loss_at, grad_at)
            what = "the loss" if loss_at <= grad_at else "a gradient"
            raise DivergedError(_diverged_msg(step, epoch, what, penalty, lr_at(cfg, step, total_steps)))

    shard = (dist.rank, dist.world) if dist.world > 1 else None  # evaluations: each rank a share, summed
    started_at = time.perf_counter() if started_at is None else started_at
    set_training_mode(model, cfg.freeze_bn_stats)
    with _SignalFlag() as flag:
        for epoch in range(start_epoch, cfg.epochs):
            sum_task = torch.zeros((), dtype=torch.float64, device=device)  # Σ of the per-sample task loss
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            t_epoch = None  # the epoch's training time runs from its first step to its last
            first = start_batch if epoch == start_epoch else 0
            batches = task.batches(
                batch_size=cfg.batch_size,
                shuffle=True,
                seed=cfg.seed,
                epoch=epoch,
                start_batch=first,
                shard=(dist.rank, dist.world),
                device=device,
                augment=augment,
            )
            for b, batch in enumerate(batches, start=first):
                if t_epoch is None:
                    t_epoch = time.perf_counter()
                    result.setup_seconds = (
                        result.setup_seconds if result.setup_seconds is not None else t_epoch - started_at
                    )
                xb, yb = batch.x, batch.y
                if dist.world == 1 and not yb.numel():  # every image of the batch skipped ($skip_bad_images)
                    continue
                bs = int(yb.shape[0])
                # the loss is Σℓ / share: the mean over the global batch once DDP averages over ranks
                share = distributed.global_share(bs, dist.world, device) if dist.world > 1 else max(1, bs)
                lr = lr_at(cfg, global_step, total_steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                with autocast(device, cfg.precision):
                    out = train_model(xb)
                    task_loss = F.cross_entropy(out.float(), yb, reduction="sum") / share
                _note_first(first_bad, 0, torch.isfinite(task_loss), global_step)
                scaler.scale(task_loss).backward()
                scaler.unscale_(opt)
                if si is not None:  # θ before the step and g = the task loss's gradient, before the penalty's is added
                    si.pre_step()
                if penalty is not None:
                    penalty.add_gradient_(lr)
                if cfg.precision != "fp16":  # under fp16 the grad scaler skips steps with non-finite gradients
                    ok = _grads_finite(params)
                    if ok is not None:
                        _note_first(first_bad, 1, ok, global_step)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                if si is not None:
                    si.post_step()
                if mask_list:
                    with torch.no_grad():
                        torch._foreach_mul_([p for p, _ in mask_list], [m for _, m in mask_list])
                global_step += 1
                sum_task += task_loss.detach().double() * (share.double() if dist.world > 1 else share)
                correct += (out.detach().argmax(1) == yb).sum()
                seen += bs
                if progress:
                    progress(1)
                saving = state_io is not None and cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0
                if saving or global_step % FINITE_CHECK_EVERY == 0:
                    check_finite(epoch)
                if saving and dist.is_main:
                    state_io.save(snapshot(epoch, b + 1))
                if flag.signum is not None:
                    check_finite(epoch, collective=False)  # ranks may see the signal at different steps
                    resumable = state_io is not None and cfg.checkpoint_every > 0
                    if resumable and dist.is_main:
                        state_io.save(snapshot(epoch, b + 1))
                    raise _interrupted(flag.signum, global_step, state_io.path if resumable else None)
            check_finite(epoch)
            lr = lr_at(cfg, max(0, global_step - 1), total_steps)
            record = _epoch_record(
                epoch, global_step, lr, sum_task, correct, seen, t_epoch, penalty, dist, device, result
            )
            last = epoch == cfg.epochs - 1
            _evaluate_epoch(model, task, cfg, device, record, result, eval_sets, train_eval_limit, shard, last)
            result.epochs.append(record)
            if log:
                log(record)
            set_training_mode(model, cfg.freeze_bn_stats)
    distributed.restore_modules(swapped)
    result.steps = global_step
    return result


def _restore(st: dict[str, Any], model, opt, scaler, si, device) -> tuple[int, int, int]:
    """Model, optimiser, grad scaler, RNG and SI state from a resumable state; (epoch, batch, global step) to go on at."""
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    if st.get("scaler"):
        scaler.load_state_dict(st["scaler"])
    restore_rng_states(st, device)
    if si is not None and st.get("si"):
        si.load_state_dict(st["si"])
    return st["epoch"], st["batch"], st["global_step"]


def _interrupted(signum: int, step: int, state_path) -> Interrupted:
    """The Interrupted error of a run stopped by ``signum`` at ``step`` (``state_path``: the resumable state written)."""
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    saved = (
        f"resumable state written to {state_path}; rerun the same command with $resume to continue"
        if state_path is not None
        else "nothing was written (use $checkpoint_every N to make runs resumable)"
    )
    return Interrupted(f"Interrupted by {name} at step {step}; {saved}.", signum)


def _epoch_record(epoch, global_step, lr, sum_task, correct, seen, t_epoch, penalty, dist, device, result) -> dict:
    """The record of an epoch (0-based ``epoch``) from its device sums, over all ranks' shares; its time (from
    ``t_epoch``, its first step, to when the sums are read) and samples are added to ``result``. ``lr``: η at its last
    step, at which the penalty's value is taken."""
    sum_task, correct = float(sum_task), int(correct)
    pen_val = penalty.value(lr) if penalty is not None else 0.0
    dt = time.perf_counter() - t_epoch if t_epoch is not None else 0.0
    if dist.world > 1:  # the epoch's statistics over all ranks' shares, not rank 0's alone
        sum_task, correct, seen = all_reduce_sum([sum_task, float(correct), float(seen)], device)
        correct, seen = int(correct), int(seen)
        (dt,) = all_reduce_max([dt], device)
    result.train_seconds += dt
    result.samples += seen
    return {
        "epoch": epoch + 1,
        "steps": global_step,
        "task_loss": sum_task / max(1, seen),
        "penalty": pen_val,
        "loss": sum_task / max(1, seen) + pen_val,
        "train_accuracy": correct / max(1, seen),
        "lr": lr,
        "seconds": dt,
        "samples_per_s": seen / max(dt, 1e-9),
        "setup_seconds": result.setup_seconds,
    }


def _evaluate_epoch(model, task, cfg, device, record, result, eval_sets, train_eval_limit, shard, last: bool) -> None:
    """The evaluations after an epoch, into ``record``: after the ``last`` one, the BatchNorm statistics first (the model
    as it will be written), then every ``eval_sets`` task, then (``train_eval_limit``) the training data."""
    if last:
        result.bn_stats = bn_stats_record(model, task, cfg, device)
        if result.bn_stats is not None:
            record["bn_stats"] = result.bn_stats["method"]
    for name, eval_task in eval_sets:
        acc, loss = evaluate_task(
            model, eval_task, device=device, batch_size=cfg.eval_batch_size, precision=cfg.precision, shard=shard
        )
        record[f"eval/{name}/accuracy"] = acc
        record[f"eval/{name}/loss"] = loss
    if last and train_eval_limit:
        acc, loss, m = evaluate_slice(
            model,
            task,
            limit=train_eval_limit,
            device=device,
            batch_size=cfg.eval_batch_size,
            precision=cfg.precision,
            shard=shard,
        )
        result.train_eval = {"accuracy": acc, "loss": loss, "samples": m}
        record["train_eval_accuracy"], record["train_eval_samples"] = acc, m


def bn_stats_record(model, task, cfg: TrainConfig, device) -> dict[str, Any] | None:
    """What happens to the BatchNorm statistics at the end of training: {"method": "recomputed", layers, samples, batches,
    batch_size} (done here, :func:`recompute_bn_stats`), {"method": "kept"} (``bn_stats="keep"``: training's moving
    average), {"method": "frozen"} (``freeze_bn_stats``: the input checkpoint's), or None for a model without them."""
    if not batchnorm_layers(model):
        return None
    if cfg.freeze_bn_stats:
        return {"method": "frozen"}
    if cfg.bn_stats == "keep":
        return {"method": "kept"}
    done = recompute_bn_stats(model, task, device=device, batch_size=cfg.batch_size, precision=cfg.precision)
    return {"method": "recomputed", **done}


def _diverged_msg(step: int, epoch: int, what: str, penalty, lr: float) -> str:
    hint = "lower $lr"
    if penalty is not None and penalty.kind in ("ewc", "online-ewc") and penalty.active:
        bound = divergence_bound(penalty.omega_max(), penalty.lam, lr)
        hint = f"η·λ·max Ω = {bound:.3g} (plain EWC under SGD diverges once it is ≥ 2): use $penalty stabilized or lower $lam/$lr"
    elif penalty is not None and penalty.active:
        hint = "lower $lr or $lam"
    return f"Training diverged at step {step + 1} (epoch {epoch + 1}): {what} became NaN or infinite; nothing was written; {hint}."
