"""``cl-tool train-next``: train a checkpoint on the next task under an EWC-family penalty."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_tool.cli._common import (BatchOpt, ConfigOpt, DataOpt, DeviceOpt, ForceOpt, ImageColOpt, InvertOpt, JsonOpt, LabelColOpt,
                                 LimitOpt, PermuteOpt, PrecisionOpt, RotateOpt, SeedOpt, SplitOpt)

EPILOG = """Examples:

  # first task: no importance file beside a0.safetensors, so no penalty
  cl-tool train-next a0.safetensors --data ./task_a -o a.safetensors

  # next task with the stabilized penalty (a.importance.safetensors is found beside a.safetensors)
  cl-tool train-next a.safetensors --data ./task_b --lambda 200 -o b.safetensors

  # permuted-MNIST task 2 from one base dataset, SGD, cosine schedule, watch task A live
  cl-tool train-next a.safetensors --data ./mnist --split train[:8000] --permute 1 --optimizer sgd --lr 0.05 --schedule cosine --eval-data A=./mnist::split=train[8000:] -o b.safetensors

  # resumable batch job, also on several GPUs/processes
  torchrun --nproc-per-node 2 -m cl_tool train-next a.safetensors --data ./task_b --checkpoint-every 200 --resume -o b.safetensors

Penalties: stabilized c = λΩ/(2(1+ηλΩ)) (default), ewc c = λΩ/2, online-ewc (ewc with Ω decayed by importance --decay), none.
η is the learning rate in force at each step.
"""


def train_next(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to continue from (.safetensors or timm folder); its parameters are the anchor θ*.")],
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write.")],
    penalty: Annotated[str, typer.Option("--penalty", help="stabilized, ewc, online-ewc or none.", rich_help_panel="Penalty")] = "stabilized",
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Penalty strength λ ≥ 0 (default 100 when an importance file is used).", rich_help_panel="Penalty")] = None,
    importance: Annotated[Optional[Path], typer.Option("--importance", help="Importance sidecar (default: <checkpoint stem>.importance.safetensors beside the checkpoint).", rich_help_panel="Penalty")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam, adamw or sgd.", rich_help_panel="Optimisation")] = "adam",
    lr: Annotated[float, typer.Option("--lr", help="Learning rate η.", rich_help_panel="Optimisation")] = 1e-3,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.", rich_help_panel="Optimisation")] = 0.0,
    nesterov: Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum (SGD).", rich_help_panel="Optimisation")] = False,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay.", rich_help_panel="Optimisation")] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="constant or cosine.", rich_help_panel="Optimisation")] = "constant",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.", rich_help_panel="Optimisation")] = 0,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", metavar="NORM", help="Clip the total gradient norm (task + penalty) to NORM.", rich_help_panel="Optimisation")] = None,
    freeze_bn_stats: Annotated[bool, typer.Option("--freeze-bn-stats", help="Keep BatchNorm running mean/variance fixed (BatchNorm layers in eval mode): the penalty protects weights, not these statistics, which otherwise drift to the new task.", rich_help_panel="Penalty")] = False,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Epochs over the new task.", rich_help_panel="Optimisation")] = 1,
    batch_size: BatchOpt = 64,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    deterministic: Annotated[bool, typer.Option("--deterministic", help="torch.use_deterministic_algorithms(True) (bit-reproducible runs and resumes on CPU).")] = False,
    si_out: Annotated[Optional[Path], typer.Option("--si-out", help="Also write Synaptic Intelligence importances of this task to FILE (a sidecar of the output).", rich_help_panel="Importance")] = None,
    si_xi: Annotated[float, typer.Option("--si-xi", help="SI damping ξ in Ω = Σ -g·Δθ / (Δθ_total² + ξ).", rich_help_panel="Importance")] = 0.1,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Mask file from `prune --mask-out`; pruned weights stay zero.", rich_help_panel="Pruning")] = None,
    grow_head: Annotated[bool, typer.Option("--grow-head", help="If the data has more classes than the model, add output rows (their importance is 0).")] = False,
    eval_data: Annotated[list[str], typer.Option("--eval-data", metavar="[NAME=]PATH[::KEY=VAL,...]", help="Evaluate on these datasets after every epoch (repeatable; old tasks too, to watch forgetting).", rich_help_panel="Logging")] = [],  # noqa: B006
    log_json: Annotated[Optional[Path], typer.Option("--log-json", help="Append one JSON object per epoch to FILE.", rich_help_panel="Logging")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", metavar="N", help="Write a resumable state every N steps (and on SIGTERM/SIGINT).", rich_help_panel="Resume")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the resumable state if it exists.", rich_help_panel="Resume")] = False,
    state_file: Annotated[Optional[Path], typer.Option("--state-file", help="Resumable state path (default <output stem>.resume.safetensors).", rich_help_panel="Resume")] = None,
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
    """Train CHECKPOINT on a new task with a penalty that keeps the old tasks (stabilized EWC by default)."""
    from cl_tool.workflows.train_next import TrainNextArgs, run_train_next

    args = TrainNextArgs(**{k: v for k, v in locals().items() if k in TrainNextArgs.__dataclass_fields__})
    run_train_next(args)
