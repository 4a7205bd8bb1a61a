"""``cl-tool importance``: compute weight importances Ω and write a sidecar file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_tool.cli._common import (BatchOpt, ConfigOpt, DataOpt, DeviceOpt, ForceOpt, ImageColOpt, InvertOpt, JsonOpt, LabelColOpt,
                                 LimitOpt, PermuteOpt, PrecisionOpt, RotateOpt, SeedOpt, SplitOpt)

EPILOG = """Examples:

  cl-tool importance a.safetensors --data ./task_a --method fisher

  cl-tool importance b.safetensors --data ./task_b --method fisher --accumulate a.importance.safetensors

  cl-tool importance b.safetensors --data ./task_b --method fisher --fisher-labels exact --samples 2000

  cl-tool importance b.safetensors --data ./task_b --method mas --mas-output softmax --accumulate a.importance.safetensors --decay 0.9

  cl-tool importance b.safetensors --data ./task_b --method signal -o b.signal.safetensors

Methods (Ω per parameter, exact per-sample statistics):
  fisher     mean over samples of (∂ log p(y|x)/∂θ)²; labels empirical (true y), sampled (y ~ p(·|x)) or exact (Σ_y p(y|x)·g_y²)
  mas        mean over samples of |∂ ‖f(x)‖²/∂θ|, f = logits or softmax
  signal     |w| times the total absolute input signal that reached w (paper §4); bias: total |output|
  magnitude  |w|
  si         collected while training: use `train-next --si-out FILE`
"""


def importance(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint whose parameters the importances belong to.")],
    data: DataOpt = [],  # noqa: B006
    method: Annotated[str, typer.Option("--method", "-m", help="fisher, mas, signal, magnitude (si: see train-next --si-out).")] = "fisher",
    fisher_labels: Annotated[str, typer.Option("--fisher-labels", help="empirical (true labels; the paper), sampled, or exact.")] = "empirical",
    mas_output: Annotated[str, typer.Option("--mas-output", help="logits (MAS paper) or softmax (the paper's code).")] = "logits",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sidecar to write (default <checkpoint stem>.importance.safetensors).")] = None,
    accumulate: Annotated[Optional[Path], typer.Option("--accumulate", metavar="PREV", help="Add the new importances to those of a previous sidecar: Ω = γ·Ω_prev + Ω_new.")] = None,
    decay: Annotated[float, typer.Option("--decay", metavar="γ", help="γ for --accumulate (1 = sum, the paper's rule; < 1 = online EWC).")] = 1.0,
    samples: Annotated[Optional[int], typer.Option("--samples", metavar="N", help="Use at most N samples.")] = None,
    batch_size: BatchOpt = 256,
    memory_budget_mb: Annotated[int, typer.Option("--memory-budget-mb", help="Bound on the extra memory of per-sample gradient chunks.")] = 512,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    split: SplitOpt = None,
    image_column: ImageColOpt = None,
    label_column: LabelColOpt = None,
    permute: PermuteOpt = None,
    rotate: RotateOpt = None,
    invert: InvertOpt = False,
    limit: LimitOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
):
    """Compute importances Ω of CHECKPOINT's parameters on a dataset and write them to a sidecar file."""
    from cl_tool.workflows.importance import ImportanceArgs, run_importance

    args = ImportanceArgs(**{k: v for k, v in locals().items() if k in ImportanceArgs.__dataclass_fields__})
    run_importance(args)
