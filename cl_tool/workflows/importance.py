"""What ``cl-tool importance`` does, separated from option parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cl_tool.errors import UsageError
from cl_tool.output import Progress, emit_json, log, print_table

METHODS = ("fisher", "mas", "signal", "magnitude", "si")
FISHER_LABELS = ("empirical", "sampled", "exact")
MAS_OUTPUTS = ("logits", "softmax")


@dataclass
class ImportanceArgs:
    checkpoint: Path
    data: list[str] = field(default_factory=list)
    method: str = "fisher"
    fisher_labels: str = "empirical"
    mas_output: str = "logits"
    output: Optional[Path] = None
    accumulate: Optional[Path] = None
    decay: float = 1.0
    samples: Optional[int] = None
    batch_size: int = 256
    memory_budget_mb: int = 512
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
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


def _validate(a: ImportanceArgs) -> None:
    from cl_tool.training import PRECISIONS

    if a.method == "si":
        raise UsageError("SI importances can only be collected while training: run `cl-tool train-next ... --si-out FILE` for the task instead.")
    if a.method not in METHODS:
        raise UsageError(f"--method {a.method} is unknown; use one of {', '.join(METHODS)}.")
    if a.fisher_labels not in FISHER_LABELS:
        raise UsageError(f"--fisher-labels {a.fisher_labels} is unknown; use one of {', '.join(FISHER_LABELS)}.")
    if a.mas_output not in MAS_OUTPUTS:
        raise UsageError(f"--mas-output {a.mas_output} is unknown; use logits or softmax.")
    if not (0.0 <= a.decay <= 1.0):
        raise UsageError(f"--decay must be in [0, 1], got {a.decay}.")
    if a.decay != 1.0 and a.accumulate is None:
        raise UsageError("--decay only applies with --accumulate PREV; add it or drop --decay.")
    if a.samples is not None and a.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {a.samples}.")
    if a.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {a.batch_size}.")
    if a.memory_budget_mb < 1:
        raise UsageError(f"--memory-budget-mb must be at least 1, got {a.memory_budget_mb}.")
    if a.precision not in PRECISIONS:
        raise UsageError(f"--precision {a.precision} is unknown; use one of {', '.join(PRECISIONS)}.")
    if a.method != "magnitude" and len(a.data) != 1:
        raise UsageError(f"--method {a.method} needs exactly one --data (got {len(a.data)}).")
    if a.method == "magnitude" and a.data:
        raise UsageError("--method magnitude needs no --data; drop it.")


def options_of(a: ImportanceArgs) -> dict[str, Any]:
    if a.method == "fisher":
        return {"fisher_labels": a.fisher_labels}
    if a.method == "mas":
        return {"mas_output": a.mas_output}
    return {}


def layer_summary(omega: dict[str, Any]) -> list[dict[str, Any]]:
    """min / median / max of Ω per parameter tensor."""
    rows = []
    for name, t in omega.items():
        f = t.detach().float().reshape(-1)
        rows.append({"parameter": name, "numel": int(f.numel()), "min": float(f.min()) if f.numel() else 0.0,
                     "median": float(f.median()) if f.numel() else 0.0, "max": float(f.max()) if f.numel() else 0.0})
    return rows


def batches_of(x, y, batch_size: int):
    for i in range(0, int(y.shape[0]), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def run_importance(a: ImportanceArgs) -> dict[str, Any]:
    import torch

    from cl_tool import distributed
    from cl_tool.atomic import FileRoles
    from cl_tool.cli._common import data_specs, seed_everything
    from cl_tool.importance import finalize_importance, importance_sums
    from cl_tool.sidecar import Sidecar, combine, default_sidecar_path, load_sidecar, save_sidecar
    from cl_tool.workflows.common import load_model, load_tasks, register_data, trainable

    _validate(a)
    output = a.output or default_sidecar_path(a.checkpoint)
    specs = data_specs(a.data, split=a.split, image_column=a.image_column, label_column=a.label_column, permute=a.permute,
                       rotate=a.rotate, invert=a.invert, limit=a.limit) if a.method != "magnitude" else []
    roles = FileRoles(force=a.force)
    roles.input(a.checkpoint, "the checkpoint")
    roles.input(a.accumulate, "--accumulate")
    roles.input(a.config, "--config")
    register_data(roles, specs, "--data")
    roles.output(output, "--output" if a.output else "the importance file")
    roles.check()
    prev = load_sidecar(a.accumulate) if a.accumulate is not None else None
    dist, device = distributed.setup(a.device)
    seed_everything(a.seed)
    ckpt, model = load_model(a.checkpoint)
    model.to(device)
    named = trainable(model)

    data_desc = None
    if a.method == "magnitude":
        sums, count = importance_sums(model, iter(()), "magnitude", device=device)
    else:
        spec = specs[0]
        (task,) = load_tasks([spec], ckpt.spec, num_classes=ckpt.spec.num_classes)
        x, y = task.x, task.y
        if a.samples is not None:
            x, y = x[: a.samples], y[: a.samples]
        if dist.world > 1:  # each rank takes a contiguous shard; sums are all-reduced below
            share = -(-int(y.shape[0]) // dist.world)
            x, y = x[dist.rank * share:(dist.rank + 1) * share], y[dist.rank * share:(dist.rank + 1) * share]
        data_desc = task.describe()
        data_desc["samples"] = int(min(len(task), a.samples or len(task)))
        gen = torch.Generator(device="cpu").manual_seed(a.seed + 7919 * dist.rank)
        with Progress(f"{a.method} importance", int(y.shape[0]) if dist.is_main else None) as bar:
            sums, count = importance_sums(model, batches_of(x, y, a.batch_size), a.method, fisher_labels=a.fisher_labels,
                                          mas_output=a.mas_output, device=device, precision=a.precision,
                                          memory_budget_mb=a.memory_budget_mb, generator=gen, progress=bar.advance)
        if dist.world > 1:
            names = list(sums)
            cnt = torch.tensor([float(count)])
            distributed.all_reduce_sum_([sums[n] for n in names] + [cnt], device)
            count = int(cnt.item())
    omega = finalize_importance(sums, count, a.method)
    missing = [n for n in named if n not in omega]
    if missing:
        raise RuntimeError(f"importance engine returned no value for {missing[0]}")
    options = options_of(a)
    fp = ckpt.fingerprint
    task_rec = {"method": a.method, "options": options, "data": data_desc, "checkpoint": str(a.checkpoint), "fingerprint": fp}
    tasks = [task_rec]
    if prev is not None:
        omega = combine(prev, omega, a.decay)
        tasks = prev.tasks + tasks
    summary = layer_summary(omega)
    result = {"output": str(output), "method": a.method, "options": options, "samples": count, "fingerprint": fp,
              "tasks": len(tasks), "decay": a.decay if prev is not None else None, "layers": summary}
    if dist.is_main:
        save_sidecar(output, Sidecar(tensors=omega, method=a.method, options=options, data=data_desc, fingerprint=fp, tasks=tasks,
                                     decay=a.decay if prev is not None else 1.0), force=a.force)
        print_table(f"Ω ({a.method}) per parameter", ["parameter", "numel", "min", "median", "max"],
                    [[r["parameter"], r["numel"], r["min"], r["median"], r["max"]] for r in summary])
        log(f"Wrote {output}: {a.method} importances of {len(omega)} tensors from {count} samples"
            f"{f', accumulated over {len(tasks)} tasks' if prev is not None else ''}.")
        if a.json_out:
            emit_json(result)
    distributed.barrier()
    return result
