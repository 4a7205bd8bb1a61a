"""``cl-tool evaluate``: accuracy of checkpoints on tasks, and the continual-learning summaries."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.atomic import FileRoles, all_or_nothing, write_text_atomic
from cl_tool.checkpoint import load_model
from cl_tool.data import (
    DATA_HELP,
    DATA_METAVAR,
    DataOptions,
    Preprocess,
    local_paths,
    match_task,
    open_tasks,
    task_specs,
)
from cl_tool.errors import GateFailed, IncompatibleError
from cl_tool.evaluation import evaluate_task
from cl_tool.lineage import sequence_break
from cl_tool.metrics import cl_summary, gate, gate_verdicts
from cl_tool.output import Output
from cl_tool.params import Args, argument, config_option, force_option, group, option
from cl_tool.plots import plot_accuracy_matrix
from cl_tool.runtime import device_option, keep_freed_memory, precision_option, resolve_device
from cl_tool.safetensors_io import read_header


@dataclass(kw_only=True)
class EvaluateArgs(Args):
    checkpoints: list[Path] = argument(
        metavar="CHECKPOINT...", help="Checkpoints in stage order (after task 1, after task 2, ...)."
    )
    data: list[str] = option(..., "--data", "-d", metavar=DATA_METAVAR, help=DATA_HELP)
    batch_size: int = option(512, "--batch-size", "-b", metavar="N", low=1, help="Samples per batch.")
    device: str = device_option()
    precision: str = precision_option()
    csv: Optional[Path] = option(
        None, "--csv", metavar="FILE", help="Also write checkpoint,task,accuracy,loss rows to FILE."
    )
    plot: Optional[Path] = option(
        None,
        "--plot",
        metavar="FILE",
        help="Draw the accuracy matrix and per-task curves to FILE.png (needs matplotlib).",
    )
    fail_under_acc: Optional[float] = option(
        None,
        "--fail-under-acc",
        metavar="X",
        low=0,
        high=1,
        help="Exit 8 if the average accuracy after the last stage is below X.",
    )
    fail_over_forgetting: Optional[float] = option(
        None, "--fail-over-forgetting", metavar="Y", low=0, high=1, help="Exit 8 if the average forgetting is above Y."
    )
    data_options: DataOptions = group(DataOptions)
    force: bool = force_option()
    config: Optional[Path] = config_option()


def accuracy_matrix(
    checkpoints, specs, options: DataOptions, *, device, batch_size: int, precision: str, out: Output
) -> tuple[list, list, list[str], list[dict[str, Any]]]:
    """R[i][j] and loss[i][j] for checkpoint i on task j, the task names and what each task read; tasks are opened
    once per preprocessing, their labels mapped to each checkpoint's classes by name."""
    opened: dict[str, list] = {}
    acc, loss, names, data = [], [], [], []
    said: set[str] = set()

    def log_once(line: str) -> None:
        if line not in said:
            said.add(line)
            out.log(line)

    try:
        for path in checkpoints:
            ckpt, model = load_model(path)
            model.to(device)
            pre = Preprocess.for_model(ckpt.spec)
            key = json.dumps([pre.key(), pre.mean, pre.std], sort_keys=True, default=str)
            if key not in opened:
                opened[key] = open_tasks(specs, ckpt.spec, options, log=log_once)
            tasks = opened[key]
            names = [t.spec.name for t in tasks]
            data = [t.describe() for t in tasks]
            row_acc, row_loss = [], []
            for task in tasks:
                match_task(task, ckpt.spec, log=log_once)
                a, l = evaluate_task(model, task, device=device, batch_size=batch_size, precision=precision)
                row_acc.append(a)
                row_loss.append(l)
            acc.append(row_acc)
            loss.append(row_loss)
    finally:
        for task in (t for ts in opened.values() for t in ts):
            task.close()
            if task.cache_note:
                out.log(task.cache_note)
    return acc, loss, names, data


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def _csv_text(stages, names, acc, loss) -> str:
    """checkpoint,task,accuracy,loss rows."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["checkpoint", "task", "accuracy", "loss"])
    for stage, row_acc, row_loss in zip(stages, acc, loss):
        for name, a, l in zip(names, row_acc, row_loss):
            writer.writerow([stage, name, f"{a:.6f}", f"{l:.6f}"])
    return buf.getvalue()


def lineage_record(path: Path) -> tuple[str | None, list[Any]]:
    """(recorded fingerprint, history) of a checkpoint, from its header alone; (None, []) when not recorded."""
    if Path(path).is_dir():  # a timm folder records no lineage
        return None, []
    _, meta = read_header(path, "Checkpoint")
    try:
        history = json.loads(meta.get("cl_tool.history", "[]"))
    except (json.JSONDecodeError, RecursionError):
        history = []  # loading the checkpoint names the damage
    return meta.get("cl_tool.fingerprint"), history if isinstance(history, list) else []


def not_sequence_note(checkpoints: list[Path], i: int) -> str:
    return (
        f"note: {checkpoints[i]} does not descend from {checkpoints[i - 1]} (per its recorded history), so the "
        f"checkpoints are not stages of one sequence: the matrix is shown without BWT, forgetting and learning accuracy."
    )


def run_evaluate(args: EvaluateArgs, out: Output) -> dict[str, Any]:
    """The accuracy matrix of ``args.checkpoints`` on the tasks ``args.data``, its summaries, optional CSV/plot and gates."""
    specs = task_specs(args.data, args.data_options, role="eval")
    roles = FileRoles(force=args.force)
    for path in args.checkpoints:
        roles.input(path, "the checkpoint")
    roles.input(args.config, "$config")
    for path in local_paths(specs):
        roles.input(path, "$data")
    roles.output(args.csv, "$csv")
    roles.output(args.plot, "$plot")
    roles.check()
    broken = sequence_break([lineage_record(p) for p in args.checkpoints])
    if broken is not None and args.fail_over_forgetting is not None:
        raise IncompatibleError(
            f"$fail_over_forgetting needs checkpoints that form a sequence, but {args.checkpoints[broken]} does not "
            f"descend from {args.checkpoints[broken - 1]} per its recorded history; give the stages of one run in order, "
            f"or drop $fail_over_forgetting."
        )
    device = resolve_device(args.device)
    keep_freed_memory()
    acc, loss, names, data = accuracy_matrix(
        args.checkpoints,
        specs,
        args.data_options,
        device=device,
        batch_size=args.batch_size,
        precision=args.precision,
        out=out,
    )
    names = _dedupe(names)
    stages = [str(p) for p in args.checkpoints]
    summary = cl_summary(acc, sequence=broken is None)
    out.table(
        "accuracy (rows: checkpoints, columns: tasks)", ["checkpoint"] + names, [[s] + r for s, r in zip(stages, acc)]
    )
    if broken is None:
        parts = [f"average accuracy {summary['average_accuracy']:.4f}"]
        for key, text in (
            ("bwt", "BWT {:+.4f}"),
            ("average_forgetting", "average forgetting {:.4f}"),
            ("learning_accuracy", "learning accuracy {:.4f}"),
        ):
            if summary.get(key) is not None:
                parts.append(text.format(summary[key]))
        out.say("; ".join(parts) + ".")
    else:
        out.log(not_sequence_note(args.checkpoints, broken))
    with all_or_nothing() as wrote:
        if args.csv is not None:
            write_text_atomic(args.csv, _csv_text(stages, names, acc, loss), force=args.force)
            wrote(args.csv)
        if args.plot is not None:
            plot_accuracy_matrix(acc, [Path(s).name for s in stages], names, args.plot, force=args.force)
            wrote(args.plot)
    result = {
        "checkpoints": stages,
        "tasks": names,
        "data": data,
        "accuracy": acc,
        "loss": loss,
        "sequence": broken is None,
        "summary": summary,
        "gates": gate_verdicts(
            summary, fail_under_acc=args.fail_under_acc, fail_over_forgetting=args.fail_over_forgetting
        ),
    }
    reason = gate(summary, fail_under_acc=args.fail_under_acc, fail_over_forgetting=args.fail_over_forgetting)
    if reason:
        error = GateFailed(reason)
        error.result = result  # --json: the result with the gates' verdicts, beside the error
        raise error
    return out.result(result)
