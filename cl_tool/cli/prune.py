"""``cl-tool prune``: zero the weights with the lowest scores (importance, magnitude or signal)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_tool.cli._common import (BatchOpt, ConfigOpt, DataOpt, DeviceOpt, ForceOpt, ImageColOpt, InvertOpt, JsonOpt, LabelColOpt,
                                 LimitOpt, PermuteOpt, RotateOpt, SplitOpt)

EPILOG = """Examples:

  cl-tool prune b.safetensors --by importance --sparsity 0.9 -o b90.safetensors

  # b was trained from a: a's stored scores are accepted (lineage from b's history)
  cl-tool prune b.safetensors --by importance --importance a.importance.safetensors --sparsity 0.9 -o b90.safetensors

  cl-tool prune b.safetensors --by magnitude --sparsity 0.5 --scope layer --include-bias -o b50.safetensors --mask-out b50.mask.safetensors

  cl-tool prune b.safetensors --by signal --score-data ./task_b --sparsity 0.95 -o b95.safetensors

  cl-tool prune b.safetensors --by magnitude --by signal --by fisher --score-data ./train --data ./test --sweep 0.5,0.7,0.8,0.9,0.95,0.97,0.99 --plot curve.png --json

Scores: magnitude |w|; importance = the sidecar beside the checkpoint (or --importance: the checkpoint's own or an
ancestor's, see `cl-tool info SIDECAR --for CHECKPOINT`); fisher/mas/si/signal = a sidecar of
that method if given/found, else (fisher, mas, signal) computed on --score-data. The k = round(sparsity·N) lowest-scored
weights are pruned; ties go to earlier tensors, then lower indices. By default only weight matrices and conv kernels are
pruned (not biases, norms, embeddings or the classifier).
"""


def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    by: Annotated[list[str], typer.Option("--by", help="Score: magnitude, importance, signal, fisher, mas or si (repeat with --sweep to compare).")] = ["importance"],  # noqa: B006
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", "-s", help="Fraction of the selected weights to zero, in [0, 1).")] = None,
    scope: Annotated[str, typer.Option("--scope", help="global (one threshold for all tensors) or layer (same sparsity in each tensor).")] = "global",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Pruned checkpoint to write.")] = None,
    mask_out: Annotated[Optional[Path], typer.Option("--mask-out", help="Write the keep-masks (1 keep, 0 pruned) to FILE for train-next --mask.")] = None,
    importance: Annotated[Optional[Path], typer.Option("--importance", help="Sidecar with the scores (default: beside the checkpoint).")] = None,
    include: Annotated[list[str], typer.Option("--include", metavar="GLOB", help="Also prune parameters whose names match GLOB (repeatable).")] = [],  # noqa: B006
    exclude: Annotated[list[str], typer.Option("--exclude", metavar="GLOB", help="Never prune parameters whose names match GLOB (repeatable).")] = [],  # noqa: B006
    include_bias: Annotated[bool, typer.Option("--include-bias", help="Prune biases too.")] = False,
    include_norm: Annotated[bool, typer.Option("--include-norm", help="Prune normalisation weights too.")] = False,
    include_classifier: Annotated[bool, typer.Option("--include-classifier", help="Prune the classifier too.")] = False,
    sweep: Annotated[Optional[str], typer.Option("--sweep", metavar="S1,S2,...", help="Evaluate these sparsities on --data without writing checkpoints.")] = None,
    data: DataOpt = [],  # noqa: B006
    score_data: Annotated[list[str], typer.Option("--score-data", metavar="[NAME=]PATH[::KEY=VAL,...]", help="Data for computing signal/fisher/mas scores when no sidecar is given (default: --data).")] = [],  # noqa: B006
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --sweep: draw accuracy vs sparsity to FILE.png (needs matplotlib).")] = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = "auto",
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
    """Prune CHECKPOINT by stored or computed scores, or sweep sparsities and report accuracy."""
    from cl_tool.workflows.prune import PruneArgs, run_prune

    args = PruneArgs(**{k: v for k, v in locals().items() if k in PruneArgs.__dataclass_fields__})
    run_prune(args)
