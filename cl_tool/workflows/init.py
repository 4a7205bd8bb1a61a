"""``cl-tool init``: write a randomly initialised checkpoint that records how to rebuild its model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.atomic import FileRoles
from cl_tool.checkpoint import history_entry, model_layout, save_checkpoint
from cl_tool.data.preprocess import resolve_timm_data_config
from cl_tool.data.transforms import SMALL_INPUT
from cl_tool.errors import UsageError
from cl_tool.models import build_model, default_normalisation, default_spec, forbidden_kwarg, parse_input_shape
from cl_tool.output import Output
from cl_tool.params import Args, config_option, force_option, option, parse_floats, parse_key_values
from cl_tool.runtime import seed_everything, seed_option


@dataclass(kw_only=True)
class InitArgs(Args):
    arch: str = option(
        ..., "--arch", "-a", metavar="NAME", help="Built-in 'mlp' or 'cnn' (the paper's nets), or any timm model name."
    )
    output: Path = option(..., "--output", "-o", metavar="FILE", help="Checkpoint to write (.safetensors).")
    arch_arg: list[str] = option(
        [],
        "--arch-arg",
        metavar="KEY=VALUE",
        help="Keyword argument for the architecture (repeatable), e.g. sizes=784,300,150,10 or img_size=28.",
    )
    input_shape: Optional[str] = option(
        None,
        "--input-shape",
        metavar="CxHxW",
        help="Input image shape; default 1x28x28 for built-ins, the timm model's default otherwise.",
    )
    num_classes: Optional[int] = option(
        None,
        "--num-classes",
        metavar="N",
        low=1,
        help="Number of output classes (default 10 for built-ins, the timm default otherwise).",
    )
    mean: Optional[str] = option(
        None,
        "--mean",
        metavar="M[,M,M]",
        help="Per-channel normalisation mean on the [0,1] scale, comma-separated (default 0 for built-ins, timm's otherwise).",
    )
    std: Optional[str] = option(
        None,
        "--std",
        metavar="S[,S,S]",
        help="Per-channel normalisation std, comma-separated (default 1 for built-ins, timm's otherwise).",
    )
    seed: int = seed_option()
    force: bool = force_option()
    config: Optional[Path] = config_option()

    def validate(self) -> None:
        self.kwargs = parse_key_values(self.arch_arg, "arch_arg")
        self.shape = parse_input_shape(self.input_shape)
        if "num_classes" in self.kwargs:
            raise UsageError("$arch_arg num_classes= is not allowed; use $num_classes instead.")
        if forbidden_kwarg(self.kwargs) is not None:
            raise UsageError(
                f"$arch_arg {forbidden_kwarg(self.kwargs)}= would make the model read files or the network; cl-tool checkpoints "
                f"start from random weights (import trained weights as a timm folder)."
            )
        in_chans = self.kwargs.get("in_chans")
        if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
            raise UsageError(f"$arch_arg in_chans={in_chans} must be a positive integer.")
        if in_chans is not None and self.shape is not None and in_chans != self.shape[0]:
            raise UsageError(f"$arch_arg in_chans={in_chans} disagrees with $input_shape {self.input_shape}.")
        if "sizes" in self.kwargs and self.arch == "mlp" and self.num_classes is None:
            try:
                self.num_classes = int(str(self.kwargs["sizes"]).split(",")[-1])
            except ValueError as exc:
                raise UsageError(
                    f"$arch_arg sizes={self.kwargs['sizes']} must be comma-separated positive integers, e.g. sizes=784,300,150,10."
                ) from exc


def run_init(args: InitArgs, out: Output) -> dict[str, Any]:
    """Build the model (built-in or timm) with random weights, check it maps the input shape to (batch, classes), write it."""
    import torch  # not at the top: `cl-tool --help` imports no torch

    roles = FileRoles(force=args.force)
    roles.input(args.config, "$config")
    roles.output(args.output, "$output")
    roles.check()
    spec = default_spec(args.arch, args.kwargs, args.shape, args.num_classes)
    if "in_chans" in args.kwargs and args.shape is None:
        spec.input_shape = (int(args.kwargs["in_chans"]),) + tuple(spec.input_shape[1:])
    channels = spec.input_shape[0]
    fallback = (spec.mean, spec.std) if len(spec.mean) == channels else default_normalisation(channels)
    spec.mean = parse_floats(args.mean, "mean", channels) or fallback[0]
    spec.std = parse_floats(args.std, "std", channels) or fallback[1]
    if any(s <= 0 for s in spec.std):
        raise UsageError("$std values must be positive.")
    if spec.source == "timm":  # recorded, so that every command preprocesses this model's images the same way
        spec.data_config = resolve_timm_data_config(spec.arch, spec.input_shape, spec.mean, spec.std)
        if min(spec.input_shape[1:]) <= SMALL_INPUT and spec.data_config.get("crop_pct", 1.0) < 1.0:
            out.log(
                f"note: the input is {spec.input_shape[1]}x{spec.input_shape[2]} (at most {SMALL_INPUT} px): crop_pct "
                f"1.0 is recorded instead of timm's {spec.data_config['crop_pct']:g} for {spec.arch}, so that evaluation "
                f"sees the whole image (a centre crop would cut the edges of a digit)."
            )
            spec.data_config["crop_pct"] = 1.0
    seed_everything(args.seed)
    model = build_model(spec)
    model.eval()  # the shape probe must not move BatchNorm running statistics (a fresh model's are 0 and 1)
    with torch.no_grad():
        logits = model(torch.zeros((2,) + tuple(spec.input_shape)))
    if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
        raise UsageError(
            f"{args.arch} with these arguments outputs shape {list(logits.shape)}, not (batch, {spec.num_classes}); "
            f"check $arch_arg and $input_shape."
        )
    n_params = sum(p.numel() for p in model.parameters())
    history = [history_entry("init", arch=args.arch, kwargs=args.kwargs, seed=args.seed)]
    fp = save_checkpoint(args.output, spec, model.state_dict(), history, force=args.force, layout=model_layout(model))
    out.log(
        f"Wrote {args.output}: {args.arch} with {n_params:,} parameters, input {'x'.join(map(str, spec.input_shape))}, "
        f"{spec.num_classes} classes."
    )
    return out.result(
        {
            "output": str(args.output),
            "arch": args.arch,
            "kwargs": args.kwargs,
            "input_shape": list(spec.input_shape),
            "num_classes": spec.num_classes,
            "parameters": n_params,
            "fingerprint": fp,
        }
    )
