"""What ``cl-tool evaluate`` does, separated from option parsing."""

from __future__ import annotations

import csv as csv_mod
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cl_tool.errors import GateFailed, UsageError
from cl_tool.output import emit_json, log, print_table


@dataclass
class EvaluateArgs:
    checkpoints: list[Path]
    data: list[str]
    batch_size: int = 512
    device: str = "auto"
    precision: str = "fp32"
    csv: Optional[Path] = None
    plot: Optional[Path] = None
    fail_under_acc: Optional[float] = None
    fail_over_forgetting: Optional[float] = None
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


def accuracy_matrix(checkpoints, specs, *, device, batch_size: int, precision: str):
    """R[i][j], loss[i][j] for checkpoint i on task j, and the task names; data loaded once per input format."""
    from cl_tool.training import evaluate_task
    from cl_tool.workflows.common import load_model, load_tasks

    cache: dict[Any, list] = {}
    acc, loss = [], []
    names: list[str] = []
    for path in checkpoints:
        ckpt, model = load_model(path)
        model.to(device)
        key = (tuple(ckpt.spec.input_shape), tuple(ckpt.spec.mean), tuple(ckpt.spec.std))
        if key not in cache:
            cache[key] = load_tasks(specs, ckpt.spec)
        tasks = cache[key]
        names = [t.spec.name for t in tasks]
        row_a, row_l = [], []
        for t in tasks:
            from cl_tool.data import check_labels

            check_labels(t, ckpt.spec.num_classes)
            a, l = evaluate_task(model, t.x, t.y, device=device, batch_size=batch_size, precision=precision)
            row_a.append(a)
            row_l.append(l)
        acc.append(row_a)
        loss.append(row_l)
    return acc, loss, names


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}#{seen[n]}")
        else:
            seen[n] = 1
            out.append(n)
    return out


def run_evaluate(a: EvaluateArgs) -> dict[str, Any]:
    from cl_tool.atomic import FileRoles, all_or_nothing, write_text_atomic
    from cl_tool.workflows.common import register_data
    from cl_tool.cli._common import data_specs
    from cl_tool.metrics import cl_summary, gate
    from cl_tool.training import PRECISIONS, resolve_device

    if not a.checkpoints:
        raise UsageError("evaluate needs at least one checkpoint.")
    if not a.data:
        raise UsageError("evaluate needs at least one --data.")
    if a.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {a.batch_size}.")
    if a.precision not in PRECISIONS:
        raise UsageError(f"--precision {a.precision} is unknown; use one of {', '.join(PRECISIONS)}.")
    for opt, val in (("--fail-under-acc", a.fail_under_acc), ("--fail-over-forgetting", a.fail_over_forgetting)):
        if val is not None and not (0.0 <= val <= 1.0):
            raise UsageError(f"{opt} must be in [0, 1], got {val}.")
    specs = data_specs(a.data, split=a.split, image_column=a.image_column, label_column=a.label_column, permute=a.permute,
                       rotate=a.rotate, invert=a.invert, limit=a.limit)
    roles = FileRoles(force=a.force)
    for path in a.checkpoints:
        roles.input(path, "the checkpoint")
    roles.input(a.config, "--config")
    register_data(roles, specs, "--data")
    roles.output(a.csv, "--csv")
    roles.output(a.plot, "--plot")
    roles.check()
    device = resolve_device(a.device)
    acc, loss, names = accuracy_matrix(a.checkpoints, specs, device=device, batch_size=a.batch_size, precision=a.precision)
    names = _dedupe(names)
    stages = [str(p) for p in a.checkpoints]
    summary = cl_summary(acc)
    result = {"checkpoints": stages, "tasks": names, "accuracy": acc, "loss": loss, "summary": summary}

    print_table("accuracy (rows: checkpoints, columns: tasks)", ["checkpoint"] + names, [[s] + r for s, r in zip(stages, acc)])
    parts = [f"average accuracy {summary['average_accuracy']:.4f}"]
    if summary.get("bwt") is not None:
        parts.append(f"BWT {summary['bwt']:+.4f}")
    if summary.get("average_forgetting") is not None:
        parts.append(f"average forgetting {summary['average_forgetting']:.4f}")
    if summary.get("learning_accuracy") is not None:
        parts.append(f"learning accuracy {summary['learning_accuracy']:.4f}")
    log("; ".join(parts) + ".")
    with all_or_nothing() as wrote:
        if a.csv is not None:
            write_text_atomic(a.csv, _csv_text(stages, names, acc, loss), force=a.force)
            wrote(a.csv)
        if a.plot is not None:
            from cl_tool.plots import plot_accuracy_matrix

            plot_accuracy_matrix(acc, [Path(s).name for s in stages], names, a.plot, force=a.force)
            wrote(a.plot)
    if a.json_out:
        emit_json(result)
    reason = gate(summary, fail_under_acc=a.fail_under_acc, fail_over_forgetting=a.fail_over_forgetting)
    if reason:
        raise GateFailed(reason)
    return result


def _csv_text(stages, names, acc, loss) -> str:
    """checkpoint,task,accuracy,loss rows."""
    buf = io.StringIO()
    w = csv_mod.writer(buf)
    w.writerow(["checkpoint", "task", "accuracy", "loss"])
    for s, ra, rl in zip(stages, acc, loss):
        for n, x, l in zip(names, ra, rl):
            w.writerow([s, n, f"{x:.6f}", f"{l:.6f}"])
    return buf.getvalue()
