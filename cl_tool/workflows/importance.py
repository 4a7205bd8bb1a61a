"""``cl-tool importance``: the importances Ω of a checkpoint's parameters on a task, written to a sidecar."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.data import DATA_HELP, DATA_METAVAR, DataOptions
from cl_tool.errors import UsageError
from cl_tool.importance import (
    BIAS_SCORES,
    FISHER_LABELS,
    MAS_OUTPUTS,
    METHODS_BY_NAME,
    SIGNAL_NORMS,
    SIGNAL_STATS,
)
from cl_tool.output import Output
from cl_tool.params import Args, argument, config_option, force_option, group, option
from cl_tool.runtime import device_option, precision_option, seed_option


@dataclass(kw_only=True)
class ImportanceArgs(Args):
    checkpoint: Path = argument(metavar="CHECKPOINT", help="Checkpoint whose parameters the importances belong to.")
    data: list[str] = option([], "--data", "-d", metavar=DATA_METAVAR, help=DATA_HELP)
    method: str = option(
        "fisher",
        "--method",
        "-m",
        metavar="METHOD",
        choices=tuple(METHODS_BY_NAME),
        help="fisher, mas, signal, magnitude (si: see train-next --si-out).",
    )
    fisher_labels: str = option(
        METHODS_BY_NAME["fisher"].options["fisher_labels"],
        "--fisher-labels",
        metavar="MODE",
        choices=FISHER_LABELS,
        help="empirical (true labels; the paper), sampled, or exact.",
    )
    mas_output: str = option(
        METHODS_BY_NAME["mas"].options["mas_output"],
        "--mas-output",
        metavar="OUTPUT",
        choices=MAS_OUTPUTS,
        help="logits (MAS paper) or softmax (the paper's code).",
    )
    bias_score: str = option(
        METHODS_BY_NAME["signal"].options["bias_score"],
        "--bias-score",
        metavar="MODE",
        choices=BIAS_SCORES,
        help="signal: a bias scores its unit's output after the activation (post-activation; softmax for the "
        "classifier; the authors' code) or before it (pre-activation).",
    )
    signal_norm: str = option(
        METHODS_BY_NAME["signal"].options["signal_norm"],
        "--signal-norm",
        metavar="NORM",
        choices=SIGNAL_NORMS,
        help="signal: the input reaching a weight totalled over each sample's positions (sum; the paper's) or "
        "averaged over them (mean: conv layers and token sequences compare with one-position layers; prunes best).",
    )
    signal_stat: str = option(
        METHODS_BY_NAME["signal"].options["signal_stat"],
        "--signal-stat",
        metavar="STAT",
        choices=SIGNAL_STATS,
        help="signal: |w|·Σ|a| (l1; the paper's) or |w|·sqrt(Σa²) (l2; Wanda's |w|·||X||_2; prunes best).",
    )
    output: Optional[Path] = option(
        None,
        "--output",
        "-o",
        metavar="FILE",
        help="Sidecar to write (default <checkpoint stem>.importance.safetensors).",
    )
    accumulate: Optional[Path] = option(
        None,
        "--accumulate",
        metavar="PREV",
        help="Add the new importances to those of a previous sidecar: Ω = γ·Ω_prev + Ω_new.",
    )
    decay: float = option(
        1.0,
        "--decay",
        metavar="γ",
        low=0,
        high=1,
        help="γ for --accumulate (1 = sum, the paper's rule; < 1 = online EWC).",
    )
    samples: Optional[int] = option(
        None,
        "--samples",
        metavar="N",
        low=1,
        help="Use at most N samples, drawn at random from the whole task (seeded by --seed); see --first-samples.",
    )
    first_samples: bool = option(
        False, "--first-samples", help="With --samples N: take the task's first N rows instead of a random N."
    )
    batch_size: int = option(256, "--batch-size", "-b", metavar="N", low=1, help="Samples per batch.")
    memory_budget_mb: int = option(
        512, "--memory-budget-mb", metavar="MB", low=1, help="Bound on the extra memory of per-sample gradient chunks."
    )
    seed: int = seed_option()
    device: str = device_option()
    precision: str = precision_option()
    deterministic: bool = option(
        False,
        "--deterministic",
        help="Bit-reproducible importances: torch.use_deterministic_algorithms(True) and all torch threads for every "
        "batch (by default a CPU runs each batch on all threads or on one, whichever is faster at the time, which "
        "can change the last bits).",
    )
    data_options: DataOptions = group(DataOptions)
    force: bool = force_option()
    config: Optional[Path] = config_option()

    def validate(self) -> None:
        method = METHODS_BY_NAME[self.method]
        if method.source == "training":
            raise UsageError(
                "SI importances can only be collected while training: run `cl-tool train-next ... $si_out FILE` for the task instead."
            )
        if self.decay != 1.0 and self.accumulate is None:
            raise UsageError("$decay only applies with $accumulate PREV; add it or drop $decay.")
        self.ignore_unless(
            method.needs_data,
            (
                "data",
                "samples",
                "first_samples",
                "batch_size",
                "memory_budget_mb",
                "precision",
                "seed",
                "deterministic",
            ),
            f"$method {self.method}",
        )
        for other in METHODS_BY_NAME.values():  # one note per other method whose options were given
            self.ignore_unless(other is method, tuple(other.options), f"$method {self.method}")
        if method.needs_data and len(self.data) != 1:
            raise UsageError(f"$method {self.method} needs exactly one $data (got {len(self.data)}).")

    @property
    def options(self) -> dict[str, Any]:
        """The method's own options, as recorded in the sidecar."""
        return {k: getattr(self, k) for k in METHODS_BY_NAME[self.method].options}


def layer_summary(omega: dict[str, Any]) -> list[dict[str, Any]]:
    """min / median / max of Ω per parameter tensor."""
    rows = []
    for name, t in omega.items():
        f = t.detach().float().reshape(-1)
        empty = f.numel() == 0
        rows.append(
            {
                "parameter": name,
                "numel": int(f.numel()),
                "min": 0.0 if empty else float(f.min()),
                "median": 0.0 if empty else float(f.median()),
                "max": 0.0 if empty else float(f.max()),
            }
        )
    return rows


def _sums_on_task(
    args: ImportanceArgs, out: Output, model, task, dist, device
) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """Σ of the statistic over ``--samples`` rows of the task (a random N by default, the first N with
    ``--first-samples``; a contiguous share of them per torchrun rank, summed over ranks)."""
    import itertools

    import torch

    from cl_tool import distributed
    from cl_tool.data.sources import subset_rows
    from cl_tool.importance import importance_sums

    n = task.num_samples if not task.streaming else None  # a stream with a known length is still read in order
    subset = None
    if n is not None:
        total = min(n, args.samples or n)
        if total < n:
            rows = subset_rows(n, limit=total) if args.first_samples else subset_rows(n, sample=total, seed=args.seed)
            subset = (
                f"the first {total:,} of {n:,}"
                if args.first_samples
                else f"a random {total:,} of {n:,} (seed {args.seed})"
            )
            if not args.first_samples:
                out.log(f"$samples {total}: {subset} rows of the task ($first_samples takes the first rows instead).")
        else:
            rows = subset_rows(n)
        share = -(-total // dist.world)
        lo, hi = dist.rank * share, min(total, (dist.rank + 1) * share)
        mine = rows[lo:hi].tolist()
        order = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        batches = ((b.x, b.y) for b in task.batches(order, device=device))
    else:  # a stream: its first --samples rows, each rank a share of every batch
        total = args.samples
        if total is not None:
            subset = f"the first {total:,} rows of a stream (read in order)"
        stream = (
            (b.x, b.y) for b in task.batches(batch_size=args.batch_size, device=device, shard=(dist.rank, dist.world))
        )
        batches = stream if total is None else itertools.islice(stream, -(-total // args.batch_size))
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 7919 * dist.rank)
    with out.progress(f"{args.method} importance", (hi - lo) if dist.is_main and n is not None else None) as bar:
        sums, count = importance_sums(
            model,
            batches,
            args.method,
            fisher_labels=args.fisher_labels,
            mas_output=args.mas_output,
            bias_score=args.bias_score,
            signal_norm=args.signal_norm,
            signal_stat=args.signal_stat,
            device=device,
            precision=args.precision,
            memory_budget_mb=args.memory_budget_mb,
            generator=gen,
            progress=bar.advance,
        )
    if dist.world > 1:
        names = list(sums)
        cnt = torch.tensor([float(count)])
        distributed.all_reduce_sum_([sums[n] for n in names] + [cnt], device)
        count = int(cnt.item())
    data_desc = task.describe()
    data_desc["samples"] = count
    if subset is not None:
        data_desc["samples_drawn"] = subset
        if task.labels is not None and n is not None:
            from cl_tool.data.classes import class_counts

            data_desc["classes"] = class_counts(task._raw_labels[rows], task.class_names)
    return sums, count, data_desc


def _combine(args: ImportanceArgs, prev, omega: dict[str, Any]) -> dict[str, Any]:
    """Ω = γ·Ω_prev + Ω_new; signal sidecars of one variant only, l2 on the squares: √(γ·Ω_prev² + Ω_new²)."""
    from cl_tool.errors import IncompatibleError
    from cl_tool.importance import stored_signal_variant
    from cl_tool.sidecar import combine

    if args.method != "signal" and prev.method != "signal":
        return combine(prev, omega, args.decay)
    ours = {"signal_norm": args.signal_norm, "signal_stat": args.signal_stat}
    theirs = stored_signal_variant(prev.options) if prev.method == "signal" else None
    if args.method != prev.method or theirs != ours:
        held = f"{prev.method}" if theirs is None else f"signal ({theirs['signal_norm']}, {theirs['signal_stat']})"
        raise IncompatibleError(
            f"$accumulate {prev.path} holds {held} importances, which do not add to {args.method}"
            f"{f' ({args.signal_norm}, {args.signal_stat})' if args.method == 'signal' else ''} ones; accumulate "
            f"sidecars of the same method and signal variant."
        )
    if args.signal_stat == "l1":
        return combine(prev, omega, args.decay)
    prev_sq = dataclasses.replace(prev, tensors={n: t.square() for n, t in prev.tensors.items()})
    return {n: t.sqrt() for n, t in combine(prev_sq, {n: t.square() for n, t in omega.items()}, args.decay).items()}


def run_importance(args: ImportanceArgs, out: Output) -> dict[str, Any]:
    """Σ of the method's per-sample statistic over the task (sharded over torchrun ranks), finalised, accumulated, written."""

    import torch

    from cl_tool import distributed
    from cl_tool.atomic import FileRoles
    from cl_tool.checkpoint import load_model
    from cl_tool.data import local_paths, open_tasks, task_specs
    from cl_tool.importance import finalize_importance, importance_sums
    from cl_tool.importance.rules import logging_chunks
    from cl_tool.models import trainable_parameters
    from cl_tool.runtime import (
        debug_enabled,
        deterministic_error,
        keep_freed_memory,
        seed_everything,
        set_cuda_precision,
        set_deterministic,
    )
    from cl_tool.sidecar import Sidecar, default_sidecar_path, load_sidecar, save_sidecar

    output = args.output or default_sidecar_path(args.checkpoint)
    method = METHODS_BY_NAME[args.method]
    specs = task_specs(args.data, args.data_options) if method.needs_data else []  # magnitude ignores --data
    roles = FileRoles(force=args.force)
    roles.input(args.checkpoint, "the checkpoint")
    roles.input(args.accumulate, "$accumulate")
    roles.input(args.config, "$config")
    for path in local_paths(specs):
        roles.input(path, "$data")
    roles.output(output, "$output" if args.output else "the importance file")
    roles.check()
    prev = load_sidecar(args.accumulate) if args.accumulate is not None else None
    dist, device = distributed.setup(args.device)
    keep_freed_memory()
    set_cuda_precision(device)
    seed_everything(args.seed)
    ckpt, model = load_model(args.checkpoint)
    model.to(device)
    named = trainable_parameters(model)

    data_desc = None
    if not method.needs_data:
        sums, count = importance_sums(model, iter(()), args.method, device=device)
    else:
        (task,) = open_tasks(specs, ckpt.spec, args.data_options, log=out.log, match=True)
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            if args.deterministic:
                set_deterministic(device)
            with logging_chunks() as chunks:
                sums, count, data_desc = _sums_on_task(args, out, model, task, dist, device)
            if debug_enabled() and dist.is_main:
                for line in chunks.lines(device):
                    out.log(line)
        except RuntimeError as exc:
            err = deterministic_error(exc)
            if err is None:
                raise
            raise err from None
        finally:
            torch.use_deterministic_algorithms(deterministic)
            task.close()
            if task.cache_note:
                out.log(task.cache_note)
    omega = finalize_importance(sums, count, args.method, signal_stat=args.signal_stat)
    missing = [n for n in named if n not in omega]
    if missing:
        raise RuntimeError(f"importance engine returned no value for {missing[0]}")
    fp = ckpt.fingerprint
    tasks = [
        {
            "method": args.method,
            "options": args.options,
            "data": data_desc,
            "checkpoint": str(args.checkpoint),
            "fingerprint": fp,
        }
    ]
    if prev is not None:
        omega = _combine(args, prev, omega)
        tasks = prev.tasks + tasks
    summary = layer_summary(omega)
    result = {
        "output": str(output),
        "method": args.method,
        "options": args.options,
        "samples": count,
        "data": data_desc,
        "fingerprint": fp,
        "tasks": len(tasks),
        "decay": args.decay if prev is not None else None,
        "layers": summary,
    }
    if dist.is_main:
        save_sidecar(
            output,
            Sidecar(
                tensors=omega,
                method=args.method,
                options=args.options,
                data=data_desc,
                fingerprint=fp,
                tasks=tasks,
                decay=args.decay if prev is not None else 1.0,
            ),
            force=args.force,
        )
        out.table(
            f"Ω ({args.method}) per parameter",
            ["parameter", "numel", "min", "median", "max"],
            [[r["parameter"], r["numel"], r["min"], r["median"], r["max"]] for r in summary],
        )
        out.log(
            f"Wrote {output}: {args.method} importances of {len(omega)} tensors from {count} samples"
            f"{f', accumulated over {len(tasks)} tasks' if prev is not None else ''}."
        )
        out.result(result)
    distributed.barrier()
    return result
