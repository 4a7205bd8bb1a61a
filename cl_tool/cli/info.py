"""``cl-tool info``: what a checkpoint, importance sidecar, mask, resume state or timm folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_tool.cli._common import ConfigOpt, JsonOpt

EPILOG = """Examples:

  cl-tool info b90.safetensors

  cl-tool info a.importance.safetensors --for b.safetensors

  cl-tool info b.safetensors a.importance.safetensors b90.mask.safetensors ./vit_folder --json

  cl-tool info b90.safetensors --verify --sparsity

Shown: the model (architecture, arguments, input shape, classes, normalisation), parameter count and
bytes by dtype, the fingerprint, the history (command, data, penalty, λ, time) and the lineage (the
recorded ancestors); for a sidecar its method, data, samples, accumulated tasks and the checkpoint it
belongs to. Only headers and metadata are read, unless --verify or --sparsity asks for the tensors.
A sidecar may be used by its own checkpoint and by the checkpoint's descendants (lineage from the
history, which is editable metadata: it prevents mistakes, it is not a signature).
"""


def info(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Checkpoints, importance sidecars, masks, resume states or timm folders.", show_default=False)],
    for_checkpoint: Annotated[Optional[Path], typer.Option("--for", metavar="CKPT", help="Say whether checkpoint CKPT may use the sidecar (mask, resume state) in PATHS, and why.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Read the tensors: recompute a checkpoint's fingerprint and compare it with the recorded one; check a sidecar's values (finite, non-negative) and a mask's (0/1). Exit 3 on a mismatch.")] = False,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Read the tensors: fraction of zero weights per parameter tensor (of pruned weights for a mask).")] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,  # noqa: ARG001 - read by the CLI entry point
):
    """Describe cl-tool files from their headers: model, size, fingerprint, history, lineage, importances."""
    from cl_tool.workflows.info import InfoArgs, run_info

    run_info(InfoArgs(paths=list(paths), for_checkpoint=for_checkpoint, verify=verify, sparsity=sparsity, json_out=json_out))
