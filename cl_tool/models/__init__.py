"""Model registry: built-in paper architectures by name, everything else through timm.

``build_model(ModelSpec)`` rebuilds a model from what a checkpoint's metadata holds. A
registry (not an if-chain) maps built-in names to builder functions; any other name is
handed to ``timm.create_model`` with its keyword args.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cl_tool.errors import BadInputError, UsageError
from cl_tool.safetensors_io import is_float

MAX_INPUT_VALUES = (
    1 << 26
)  # values per sample: 3x4096x4096 fits; more is a typo, and building a model for it would exhaust memory

_BUILTIN: dict[str, Callable[..., Any]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_model(name: str):
    """Decorator: register a builder ``fn(input_shape, num_classes, **kwargs) -> nn.Module``."""

    def deco(fn):
        _BUILTIN[name] = fn
        return fn

    return deco


def builtin_names() -> list[str]:
    _load_builtins()
    return sorted(_BUILTIN)


def _load_builtins() -> None:
    from cl_tool.models import paper  # noqa: F401  (registers mlp and cnn)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored as JSON in a checkpoint's metadata.

    ``input_shape`` is (C, H, W); ``mean``/``std`` are per-channel normalisation applied to
    images scaled to [0, 1].
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    source: str = "builtin"  # "builtin" or "timm"
    #: timm models: the data config their images are preprocessed with (timm.data.resolve_data_config: input_size,
    #: interpolation, mean, std, crop_pct, crop_mode), recorded so that every command preprocesses identically.
    data_config: dict[str, Any] | None = None
    #: The class each output row stands for (a name, or None for a row no named data has used yet); None: not
    #: recorded (checkpoints written before names were): labels then map to rows by position (cl_tool.data.classes).
    class_names: list[str | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.data_config is None:  # checkpoints written before data configs were recorded keep their digest
            del d["data_config"]
        else:
            d["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        if self.class_names is None:  # checkpoints without class names keep their digest
            del d["class_names"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        try:
            spec = cls(
                arch=str(d["arch"]),
                kwargs=dict(d.get("kwargs") or {}),
                input_shape=tuple(int(x) for x in d["input_shape"]),
                num_classes=int(d["num_classes"]),
                mean=tuple(float(x) for x in d.get("mean", (0.0,))),
                std=tuple(float(x) for x in d.get("std", (1.0,))),
                source=str(d.get("source", "builtin")),
                data_config=d.get("data_config"),
            )
            from cl_tool.data.classes import check_names

            spec.class_names = check_names(d.get("class_names"), spec.num_classes, "The checkpoint metadata")
            if spec.data_config is not None and not isinstance(spec.data_config, dict):
                raise TypeError("data_config must be a JSON object")
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(
                f"The model description in the checkpoint metadata is malformed ({exc!r}); the file was not written by cl-tool or is damaged."
            ) from exc
        spec.validate("The checkpoint metadata")
        return spec

    def validate(self, where: str) -> None:
        """Raise BadInputError unless shape, classes, normalisation and kwargs are sane (``where`` names the source)."""
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise BadInputError(
                f"{where} has an invalid input shape {list(self.input_shape)}; expected C,H,W with positive sizes."
            )
        if math.prod(self.input_shape) > MAX_INPUT_VALUES:
            raise BadInputError(
                f"{where} has an input shape {list(self.input_shape)} of more than {MAX_INPUT_VALUES:,} values per sample; the file is damaged."
            )
        c = self.input_shape[0]
        if self.num_classes < 1:
            raise BadInputError(f"{where} has an invalid number of classes {self.num_classes}; the file is damaged.")
        if (
            len(self.mean) != c
            or len(self.std) != c
            or not all(math.isfinite(v) for v in self.mean + self.std)
            or min(self.std) <= 0
        ):
            raise BadInputError(
                f"{where} has invalid normalisation (mean {list(self.mean)}, std {list(self.std)}) for {c} channel(s); "
                f"it needs {c} finite value(s) each and a positive std; the file is damaged."
            )
        key = forbidden_kwarg(self.kwargs)
        if key is not None:
            raise BadInputError(
                f"{where} asks the model builder for {key!r}, which would make cl-tool read other files or the network; "
                f"cl-tool refuses it: remove that model argument."
            )


#: Model keyword arguments that make a builder open files or the network (timm's pretrained machinery and the like).
_FORBIDDEN_KWARGS = {"checkpoint_path", "cache_dir", "pretrained_strict", "features_only_path"}
_FORBIDDEN_SUFFIXES = {"path", "file", "filename", "url", "dir", "uri"}
_URL_RE = re.compile(r"^([a-z][a-z0-9+.-]*://|hf[-_]hub:)", re.IGNORECASE)


def forbidden_kwarg(kwargs: dict[str, Any]) -> str | None:
    """The first key (at any nesting depth) that could make a model builder read a file or the network, or None.

    Refused: timm's ``pretrained*`` arguments and ``checkpoint_path``/``cache_dir``, any key ending in
    ``_path``/``_file``/``_url``/``_dir`` or naming a hub, and any string value that is a URL or hub id.
    """
    for key, value in kwargs.items():
        low = str(key).lower()
        tokens = low.split("_")
        if (
            low in _FORBIDDEN_KWARGS
            or low.startswith("pretrained")
            or tokens[-1] in _FORBIDDEN_SUFFIXES
            or "hub" in tokens
        ):
            return str(key)
        if isinstance(value, str) and _URL_RE.match(value):
            return str(key)
        if isinstance(value, dict):
            inner = forbidden_kwarg(value)
            if inner is not None:
                return f"{key}.{inner}"
    return None


def build_model(spec: ModelSpec):
    """Build an (untrained) ``nn.Module`` for ``spec``; raise a clear error for unknown names."""
    _load_builtins()
    if spec.arch in _BUILTIN:
        try:
            return _BUILTIN[spec.arch](tuple(spec.input_shape), spec.num_classes, **spec.kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. sizes=784,abc,10 or a negative width
            raise UsageError(
                f"Invalid $arch_arg for {spec.arch}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}."
            ) from exc
    import timm

    if not timm.is_model(spec.arch):
        raise BadInputError(
            f"Unknown architecture {spec.arch!r}: use a built-in ({', '.join(builtin_names())}) or a timm model name (see `timm.list_models()`)."
        )
    kwargs = dict(spec.kwargs)
    kwargs.setdefault("in_chans", spec.input_shape[0])
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise UsageError(f"timm could not build {spec.arch} with {kwargs}: {exc}.") from exc


def default_spec(
    arch: str, kwargs: dict[str, Any], input_shape: tuple[int, int, int] | None, num_classes: int | None
) -> ModelSpec:
    """Fill in input shape, classes and normalisation defaults for ``arch``."""
    _load_builtins()
    if arch in _BUILTIN:
        shape = input_shape or (1, 28, 28)
        return ModelSpec(
            arch=arch,
            kwargs=kwargs,
            input_shape=shape,
            num_classes=num_classes or 10,
            mean=(0.0,) * shape[0],
            std=(1.0,) * shape[0],
            source="builtin",
        )
    import timm

    if not timm.is_model(arch):
        raise UsageError(
            f"$arch {arch!r} is unknown: use a built-in ({', '.join(builtin_names())}) or a timm model name (see `timm.list_models()`)."
        )
    cfg = {}
    try:
        cfg = timm.models.get_pretrained_cfg(arch).to_dict()  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - a model without a pretrained cfg is fine
        cfg = {}
    shape = input_shape or tuple(cfg.get("input_size", (3, 224, 224)))
    c = shape[0]
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != c:
        mean, std = default_normalisation(c)
    return ModelSpec(
        arch=arch,
        kwargs=kwargs,
        input_shape=tuple(shape),
        num_classes=num_classes or int(cfg.get("num_classes", 1000)),
        mean=mean,
        std=std,
        source="timm",
    )


def default_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) when a model's statistics do not fit its channel count (e.g. timm's RGB stats for grey input)."""
    return (0.5,) * channels, (0.5,) * channels


def trainable_parameters(model) -> dict[str, Any]:
    """name → parameter for the parameters that require gradients, in ``named_parameters()`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def guess_classifier_names(named_params: dict[str, Any]) -> tuple[str, ...]:
    """The classifier of a model known by its tensors only (name → tensor, array or ``TensorInfo``): the last float
    tensor with ``ndim >= 2`` and its siblings (``head.weight``, ``head.bias``); ``()`` if none."""
    last = None
    for name, t in named_params.items():
        if is_float(t) and len(t.shape) >= 2:
            last = name
    if last is None:
        return ()
    if "." not in last:
        return (last,)
    prefix = last.rsplit(".", 1)[0] + "."
    return tuple(n for n in named_params if n.startswith(prefix) and "." not in n[len(prefix) :])


def classifier_param_names(model) -> tuple[str, ...]:
    """Names of the classifier's parameters of ``model`` (for ``classifier_names``).

    Uses timm's ``model.get_classifier()`` when the model has it (a parameter-less head,
    e.g. ``num_classes=0``, gives ``()``); otherwise the last ``nn.Linear`` in
    ``named_modules()`` order; ``()`` if there is none.
    """
    import torch

    head = None
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if not isinstance(head, torch.nn.Module):
            return ()
    else:
        for _, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                head = mod
    if head is None:
        return ()
    prefix = None
    for mod_name, mod in model.named_modules():
        if mod is head:
            prefix = mod_name
            break
    if prefix is None:
        return ()
    if prefix == "":
        return tuple(n for n, _ in model.named_parameters())
    return tuple(n for n, _ in model.named_parameters() if n.startswith(prefix + "."))


def parse_input_shape(text: str | None, name: str = "input_shape") -> tuple[int, int, int] | None:
    """``"1x28x28"`` (or ``1,28,28``) → (C, H, W); errors name ``$name``."""
    if text is None:
        return None
    parts = [p for p in text.lower().replace(",", "x").split("x") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise UsageError(f"${name} {text!r} is not of the form CxHxW, e.g. 1x28x28.") from exc
    if len(values) != 3 or min(values) < 1:
        raise UsageError(f"${name} {text!r} is not of the form CxHxW with positive sizes, e.g. 1x28x28.")
    if math.prod(values) > MAX_INPUT_VALUES:
        raise UsageError(
            f"${name} {text!r} has {math.prod(values):,} values per sample, more than cl-tool's limit of {MAX_INPUT_VALUES:,}; check the sizes."
        )
    return values  # type: ignore[return-value]
