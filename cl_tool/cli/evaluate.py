"""``cl-tool evaluate``: accuracy of checkpoints on tasks, and continual-learning summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_tool.cli._common import (BatchOpt, ConfigOpt, DataOpt, DeviceOpt, ForceOpt, ImageColOpt, InvertOpt, JsonOpt, LabelColOpt,
                                 LimitOpt, PermuteOpt, PrecisionOpt, RotateOpt, SplitOpt)

EPILOG = """Examples:

  cl-tool evaluate a.safetensors b.safetensors --data A=./task_a --data B=./task_b

  cl-tool evaluate t1.safetensors t2.safetensors t3.safetensors --data ./mnist::split=train[8000:] --data ./mnist::split=train[8000:],permute=1 --data ./mnist::split=train[8000:],permute=2 --json

  cl-tool evaluate a.safetensors b.safetensors --data A=./task_a --data B=./task_b --fail-over-forgetting 0.05 --csv r.csv --plot r.png

Rows are checkpoints (stage i), columns tasks (j); R[i][j] is accuracy. With k checkpoints and m tasks:
  average accuracy  ACC = (1/m) Σ_j R[k-1][j]
  backward transfer BWT = (1/(m-1)) Σ_{j<m-1} (R[m-1][j] - R[j][j])           (k = m; Lopez-Paz & Ranzato 2017)
  forgetting        f_j = max_{l<k-1} R[l][j] - R[k-1][j], averaged over j < k-1 (Chaudhry et al. 2018)
  learning accuracy LA  = (1/m) Σ_j R[j][j]                                    (k = m)
"""


def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints in stage order (after task 1, after task 2, ...).")],
    data: DataOpt,
    batch_size: BatchOpt = 512,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write checkpoint,task,accuracy,loss rows to FILE.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the accuracy matrix and per-task curves to FILE.png (needs matplotlib).")] = None,
    fail_under_acc: Annotated[Optional[float], typer.Option("--fail-under-acc", metavar="X", help="Exit 8 if the average accuracy after the last stage is below X.")] = None,
    fail_over_forgetting: Annotated[Optional[float], typer.Option("--fail-over-forgetting", metavar="Y", help="Exit 8 if the average forgetting is above Y.")] = None,
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
    """Accuracy and loss of each checkpoint on each task, with average accuracy, BWT and forgetting."""
    from cl_tool.workflows.evaluate import EvaluateArgs, run_evaluate

    args = EvaluateArgs(**{k: v for k, v in locals().items() if k in EvaluateArgs.__dataclass_fields__})
    run_evaluate(args)
