"""``cl-tool init``: write a freshly initialised checkpoint for a built-in or timm architecture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_tool.cli._common import ConfigOpt, ForceOpt, JsonOpt, SeedOpt, history_entry, parse_kv, parse_shape

EPILOG = """Examples:

  cl-tool init --arch mlp --arch-arg sizes=784,300,150,10 --input-shape 1x28x28 -o a0.safetensors

  cl-tool init --arch cnn --input-shape 1x28x28 --num-classes 10 -o cnn0.safetensors

  cl-tool init --arch vit_tiny_patch16_224 --arch-arg img_size=28 --arch-arg patch_size=4 --input-shape 1x28x28 --num-classes 10 -o vit0.safetensors

  cl-tool init --arch resnet18 --input-shape 3x32x32 --num-classes 100 -o r0.safetensors
"""


def _floats(text: Optional[str], option: str, n: int) -> Optional[tuple[float, ...]]:
    from cl_tool.errors import UsageError

    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"{option} {text!r} must be comma-separated numbers.") from exc
    if not all(math.isfinite(v) and abs(v) <= 3.4e38 for v in vals):
        raise UsageError(f"{option} {text!r} must be finite numbers (within float32's range).")
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise UsageError(f"{option} has {len(vals)} values but the input has {n} channels.")
    return vals


def init(
    arch: Annotated[str, typer.Option("--arch", "-a", help="Built-in 'mlp' or 'cnn' (the paper's nets), or any timm model name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    arch_arg: Annotated[list[str], typer.Option("--arch-arg", metavar="KEY=VALUE", help="Keyword argument for the architecture (repeatable), e.g. sizes=784,300,150,10 or img_size=28.")] = [],  # noqa: B006
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="CxHxW", help="Input image shape; default 1x28x28 for built-ins, the timm model's default otherwise.")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Number of output classes (default 10 for built-ins, the timm default otherwise).")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel normalisation mean on the [0,1] scale, comma-separated (default 0 for built-ins, timm's otherwise).")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel normalisation std, comma-separated (default 1 for built-ins, timm's otherwise).")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
):
    """Create an initialised model checkpoint (random weights) that records how to rebuild the model."""
    from cl_tool.atomic import FileRoles
    from cl_tool.errors import UsageError
    from cl_tool.output import emit_json, log

    roles = FileRoles(force=force)
    roles.input(config, "--config")
    roles.output(output, "--output")
    roles.check()
    kwargs = parse_kv(arch_arg, "--arch-arg")
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}.")
    shape = parse_shape(input_shape)
    from cl_tool.models import forbidden_kwarg

    if "num_classes" in kwargs:
        raise UsageError("--arch-arg num_classes= is not allowed; use --num-classes instead.")
    if forbidden_kwarg(kwargs) is not None:
        raise UsageError(f"--arch-arg {forbidden_kwarg(kwargs)}= would make the model read files or the network; cl-tool checkpoints start from random weights (import trained weights as a timm folder).")
    if "sizes" in kwargs and arch == "mlp" and num_classes is None:
        try:
            num_classes = int(str(kwargs["sizes"]).split(",")[-1])
        except ValueError as exc:
            raise UsageError(f"--arch-arg sizes={kwargs['sizes']} must be comma-separated positive integers, e.g. sizes=784,300,150,10.") from exc
    if "in_chans" in kwargs and (isinstance(kwargs["in_chans"], bool) or not isinstance(kwargs["in_chans"], int) or kwargs["in_chans"] < 1):
        raise UsageError(f"--arch-arg in_chans={kwargs['in_chans']} must be a positive integer.")
    if "in_chans" in kwargs and shape is not None and int(kwargs["in_chans"]) != shape[0]:
        raise UsageError(f"--arch-arg in_chans={kwargs['in_chans']} disagrees with --input-shape {input_shape}.")

    from cl_tool.checkpoint import save_checkpoint
    from cl_tool.cli._common import seed_everything
    from cl_tool.models import build_model, default_spec

    spec = default_spec(arch, kwargs, shape, num_classes)
    if "in_chans" in kwargs and shape is None:
        spec.input_shape = (int(kwargs["in_chans"]),) + tuple(spec.input_shape[1:])
    spec.mean = _floats(mean, "--mean", spec.input_shape[0]) or (spec.mean if len(spec.mean) == spec.input_shape[0] else (0.5,) * spec.input_shape[0])
    spec.std = _floats(std, "--std", spec.input_shape[0]) or (spec.std if len(spec.std) == spec.input_shape[0] else (0.5,) * spec.input_shape[0])
    if any(s <= 0 for s in spec.std):
        raise UsageError("--std values must be positive.")
    seed_everything(seed)
    model = build_model(spec)
    import torch

    with torch.no_grad():
        out = model(torch.zeros((2,) + tuple(spec.input_shape)))
    if out.ndim != 2 or out.shape[1] != spec.num_classes:
        raise UsageError(f"{arch} with these arguments outputs shape {list(out.shape)}, not (batch, {spec.num_classes}); check --arch-arg and --input-shape.")
    n_params = sum(p.numel() for p in model.parameters())
    from cl_tool.checkpoint import model_layout

    fp = save_checkpoint(output, spec, model.state_dict(), [history_entry("init", arch=arch, kwargs=kwargs, seed=seed)], force=force,
                         layout=model_layout(model))
    result = {"output": str(output), "arch": arch, "kwargs": kwargs, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
              "parameters": n_params, "fingerprint": fp}
    if json_out:
        emit_json(result)
    log(f"Wrote {output}: {arch} with {n_params:,} parameters, input {'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes.")
