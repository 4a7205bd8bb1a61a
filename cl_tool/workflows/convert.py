"""``cl-tool convert``: turn a timm folder into a cl-tool checkpoint, reading ``pytorch_model.bin`` if that is all it has.

A ``pytorch_model.bin`` is a pickle. It is read only here, only on the user's request, with
``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors and plain
containers and refuses every other object, so no code in the file runs. The tensors are then
checked against the architecture of the folder's ``config.json`` like any checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.atomic import FileRoles
from cl_tool.checkpoint import (
    Checkpoint,
    history_entry,
    instantiate,
    model_layout,
    refuse_nonfinite,
    save_checkpoint,
    spec_from_timm_config,
)
from cl_tool.errors import BadInputError
from cl_tool.output import Output
from cl_tool.params import Args, argument, config_option, force_option, option
from cl_tool.safetensors_io import load_tensors

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(kw_only=True)
class ConvertArgs(Args):
    folder: Path = argument(
        metavar="FOLDER", help="A timm model folder: config.json and model.safetensors or pytorch_model.bin."
    )
    output: Path = option(..., "--output", "-o", metavar="FILE", help="cl-tool checkpoint to write (.safetensors).")
    force: bool = force_option()
    config: Optional[Path] = config_option()


_GENERIC = ("Weights only load failed", "Check the documentation", "Re-running `torch.load`", "In PyTorch 2.6")


def torch_reason(exc: BaseException, limit: int = 200) -> str:
    """The specific reason in torch.load's error, whole sentences of at most ``limit`` characters, no trailing dot.

    torch's weights-only message opens with general advice (including to load with ``weights_only=False``, which
    cl-tool never does); the line naming what was refused ("Trying to load unsupported GLOBAL posix.system ...")
    is kept. A reason longer than ``limit`` ends at its last whole sentence, or word, with "…".
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    specific = [ln for ln in lines if not ln.startswith(_GENERIC)]
    text = (specific or lines or [type(exc).__name__])[0]
    if specific == [] and lines:  # only the generic text: its first sentence
        text = text.split(". ")[0]
    text = text.rstrip(".")
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return (cut[:end] if end > limit // 2 else cut[: cut.rfind(" ")]) + " …"


def _load_pickled_weights(path: Path) -> dict[str, Any]:
    """The tensors of a ``pytorch_model.bin`` through ``torch.load(weights_only=True)``; anything else is refused."""
    import pickle

    import torch  # not at the top: `cl-tool --help` imports no torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as exc:
        raise BadInputError(
            f"{path} could not be read as tensors with torch.load(weights_only=True) ({torch_reason(exc)}); "
            f"it holds other objects or is damaged, and cl-tool runs no code from a pickle."
        ) from exc
    if (
        isinstance(state, dict)
        and len(state) == 1
        and next(iter(state)) in ("state_dict", "model")
        and isinstance(next(iter(state.values())), dict)
    ):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadInputError(f"{path} does not hold a state dict (parameter name → tensor); cl-tool cannot convert it.")
    return state


def run_convert(args: ConvertArgs, out: Output) -> dict[str, Any]:
    """Read FOLDER's config and weights, check them against the architecture, write one cl-tool checkpoint."""
    roles = FileRoles(force=args.force)
    roles.input(args.folder, "FOLDER")
    roles.input(args.config, "$config")
    roles.output(args.output, "$output")
    roles.check()
    if not args.folder.is_dir() or not (args.folder / "config.json").is_file():
        raise BadInputError(
            f"{args.folder} is not a timm model folder (config.json with model.safetensors or pytorch_model.bin)."
        )
    spec = spec_from_timm_config(args.folder / "config.json")
    weights = next((args.folder / name for name in WEIGHT_FILES if (args.folder / name).is_file()), None)
    if weights is None:
        raise BadInputError(f"{args.folder} has no model.safetensors or pytorch_model.bin next to config.json.")
    if weights.suffix == ".bin":
        state = _load_pickled_weights(weights)
        out.log(f"Read {weights} with torch.load(weights_only=True): tensors only, no code from the pickle was run.")
    else:
        state, _ = load_tensors(weights, "Checkpoint")
    ckpt = refuse_nonfinite(Checkpoint(spec=spec, state=state, path=str(args.folder)), args.folder)
    model = instantiate(ckpt)  # names, shapes and dtypes checked against the architecture
    history = [history_entry("convert", source=str(args.folder), weights=weights.name)]
    fp = save_checkpoint(args.output, spec, model.state_dict(), history, force=args.force, layout=model_layout(model))
    n_params = sum(p.numel() for p in model.parameters())
    out.log(
        f"Wrote {args.output}: {spec.arch} with {n_params:,} parameters, input {'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes."
    )
    return out.result(
        {
            "output": str(args.output),
            "arch": spec.arch,
            "weights": weights.name,
            "parameters": n_params,
            "fingerprint": fp,
        }
    )
