"""cl-tool checkpoints: one ``.safetensors`` file that rebuilds its model on its own.

Layout: the model's full ``state_dict`` (parameters and buffers) as tensors, and in
``__metadata__`` (string → string):

- ``cl_tool.format``: ``"1"``
- ``cl_tool.model``: JSON of :class:`cl_tool.models.ModelSpec` (arch, kwargs, input shape,
  number of classes, mean/std normalisation, source builtin|timm)
- ``cl_tool.history``: JSON list, one entry per command that produced this file (command,
  data, penalty, λ, epochs, ...), oldest first; bounded by :func:`trim_history`
- ``cl_tool.fingerprint``: :func:`cl_tool.safetensors_io.fingerprint` of the tensors
- ``cl_tool.extra``: JSON dict for command-specific records (e.g. pruning scores/sparsity)

A timm-style folder (``config.json`` + ``model.safetensors``, as ``timm.models.push_to_hf_hub``'s
``save_for_hf`` writes) is accepted as input too. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_tool import __version__
from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.lineage import describe_history
from cl_tool.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    build_model,
    classifier_param_names,
    default_normalisation,
)
from cl_tool.safetensors_io import (
    FLOAT_CODES,
    FLOAT_NAMES,
    dtype_name,
    fingerprint,
    load_tensors,
    numel,
    read_header,
    save_tensors,
    scan_tensors,
    sparsity_record,
    tensor_summary,
)

FORMAT_VERSION = "1"
HISTORY_LIMIT = 50  # the newest entries a written checkpoint keeps whole
LINEAGE_LIMIT = 1000  # generations it keeps in all: older entries than the newest HISTORY_LIMIT keep only their lineage
ENTRY_BYTES = 16_384  # an entry longer than this (as JSON) keeps only its lineage
STUB_BYTES = 1024  # a lineage-only entry longer than this loses its "grown" list
_LINEAGE_KEYS = ("command", "time", "anchor_fingerprint", "source_fingerprint", "grown")


@dataclass
class Checkpoint:
    spec: ModelSpec
    state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    layout: dict[str, Any] | None = None  # recorded at save time: see model_layout()

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fp"):
            self._fp = fingerprint(self.state)
        return self._fp


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor holding NaN or ±Inf, or None."""
    import torch  # inside functions: `cl-tool --help` and header-only `info` import no torch

    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def nonfinite_text(where, name: str) -> str:
    return f"Checkpoint {where} has NaN or infinite values in {name!r}; it comes from a diverged run: use an earlier checkpoint."


def refuse_nonfinite(ckpt: Checkpoint, where) -> Checkpoint:
    bad = first_nonfinite(ckpt.state)
    if bad is not None:
        raise BadInputError(nonfinite_text(where, bad))
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a cl-tool checkpoint file or a timm-style folder; validate its metadata."""
    p = Path(path)
    if p.is_dir():
        return _load_timm_folder(p)
    tensors, metadata = load_tensors(p, "Checkpoint")
    if "cl_tool.model" not in metadata:
        if metadata.get("cl_tool.sidecar"):
            raise BadInputError(
                f"{p} is an importance sidecar, not a checkpoint; pass the model checkpoint (e.g. the file without '.importance')."
            )
        raise BadInputError(
            f"Checkpoint {p} has no cl-tool model metadata; create checkpoints with `cl-tool init`, or put the weights in a timm folder (config.json + model.safetensors)."
        )

    def meta(key: str, default: Any) -> Any:  # any JSON value: one of the wrong type is replaced below
        return metadata_json(metadata, key, f"Checkpoint {p}", default, (object,))

    spec = ModelSpec.from_dict(meta("cl_tool.model", {}))
    history, extra, layout = meta("cl_tool.history", []), meta("cl_tool.extra", {}), meta("cl_tool.layout", None)
    if layout is not None and not _valid_layout(layout):
        raise BadInputError(f"Checkpoint {p} has malformed metadata 'cl_tool.layout'; the file is damaged.")
    ckpt = Checkpoint(
        spec=spec,
        state=tensors,
        history=history if isinstance(history, list) else [],
        extra=extra if isinstance(extra, dict) else {},
        path=str(p),
        layout=layout,
    )
    return refuse_nonfinite(ckpt, p)


def _load_timm_folder(folder: Path) -> Checkpoint:
    spec, weights = timm_folder_spec(folder)
    tensors, _ = load_tensors(weights, "Checkpoint")
    ckpt = Checkpoint(spec=spec, state=tensors, history=[{"command": "import", "from": str(folder)}], path=str(folder))
    return refuse_nonfinite(ckpt, folder)


def timm_folder_spec(folder: Path) -> tuple[ModelSpec, Path]:
    """The model description of a timm folder (from its config.json) and the path of its weights; reads no tensors."""
    cfg_path = folder / "config.json"
    weights = folder / "model.safetensors"
    if not cfg_path.is_file():
        raise BadInputError(
            f"Folder {folder} is not a timm model folder (no config.json); give a .safetensors checkpoint or a folder with config.json + model.safetensors."
        )
    if not weights.is_file():
        if (folder / "pytorch_model.bin").is_file():
            raise BadInputError(
                f"Folder {folder} has only pytorch_model.bin, a pickle that cl-tool does not load on its own; "
                f"convert it once with `cl-tool convert {folder} -o model.safetensors`."
            )
        raise BadInputError(f"Folder {folder} has no model.safetensors next to config.json.")
    return spec_from_timm_config(cfg_path), weights


def spec_from_timm_config(cfg_path: Path) -> ModelSpec:
    """A validated ModelSpec from a timm ``config.json``; every field's type is checked (exit 3 naming it)."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise BadInputError(
            f"{cfg_path} is not a valid timm config.json (not readable JSON); re-export the model with timm."
        ) from exc

    def bad(field_name: str, expected: str):
        return BadInputError(f"{cfg_path}: field {field_name!r} must be {expected}; fix or re-export the config.json.")

    if not isinstance(cfg, dict):
        raise bad("(top level)", "a JSON object")
    arch = cfg.get("architecture", cfg.get("model_name"))
    if not isinstance(arch, str) or not arch:
        raise bad("architecture", "the timm model name (a non-empty string)")
    pre = cfg.get("pretrained_cfg", {}) or {}
    kwargs = cfg.get("model_args", {}) or {}
    for name, value in (("pretrained_cfg", pre), ("model_args", kwargs)):
        if not isinstance(value, dict):
            raise bad(name, "a JSON object")
    kwargs = dict(kwargs)

    def positive_int(value, field_name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(field_name, "a positive integer")
        return value

    num_classes = kwargs.pop("num_classes", cfg.get("num_classes", pre.get("num_classes", 1000)))
    num_classes = positive_int(num_classes, "num_classes")
    size = pre.get("input_size", [3, 224, 224])
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise bad("pretrained_cfg.input_size", "a list of 3 positive integers [C, H, W]")
    input_shape = tuple(positive_int(v, "pretrained_cfg.input_size") for v in size)
    if "in_chans" in kwargs:
        input_shape = (positive_int(kwargs["in_chans"], "model_args.in_chans"),) + input_shape[1:]
    if "img_size" in kwargs:
        s = kwargs["img_size"]
        s = [s, s] if isinstance(s, int) and not isinstance(s, bool) else s
        if not isinstance(s, (list, tuple)) or len(s) != 2:
            raise bad("model_args.img_size", "a positive integer or a list of two")
        input_shape = (input_shape[0],) + tuple(positive_int(v, "model_args.img_size") for v in s)
    norm = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = pre.get(key, default)
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise bad(f"pretrained_cfg.{key}", "a list of numbers")
        norm[key] = tuple(float(v) for v in value)
    if len(norm["mean"]) != input_shape[0]:  # timm's RGB statistics for a model of another channel count
        norm = dict(zip(("mean", "std"), default_normalisation(input_shape[0])))
    spec = ModelSpec(
        arch=arch,
        kwargs=kwargs,
        input_shape=input_shape,
        num_classes=num_classes,
        mean=norm["mean"],
        std=norm["std"],
        source="timm",
    )
    labels = cfg.get("label_names")  # timm's save_for_hf writes the class names it knows
    if isinstance(labels, list) and all(isinstance(v, str) for v in labels) and len(set(labels)) == num_classes:
        spec.class_names = list(labels)
    spec.validate(str(cfg_path))
    # What timm.data.resolve_data_config gives for this pretrained_cfg, read without importing timm (`info` stays
    # torch-free): the folder's own geometry, else timm's defaults (bicubic, crop_pct 0.875, centre crop).
    geometry = {"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}
    geometry.update(
        {
            k: pre[k]
            for k in geometry
            if isinstance(pre.get(k), type(geometry[k])) or (k == "crop_pct" and isinstance(pre.get(k), int))
        }
    )
    spec.data_config = {"input_size": input_shape, "mean": spec.mean, "std": spec.std, **geometry}
    return spec


def metadata_json(meta: dict[str, str], key: str, where: str, default: Any, types: tuple[type, ...]) -> Any:
    """The JSON value of metadata ``key`` (``default`` when absent), which must be of one of ``types``."""
    if key not in meta:
        return default
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadInputError(f"{where} has malformed metadata {key!r} (not JSON); the file is damaged.") from exc
    if not isinstance(value, types):
        raise BadInputError(
            f"{where} has malformed metadata {key!r} (a {type(value).__name__}, expected {' or '.join(t.__name__ for t in types)}); the file is damaged."
        )
    return value


def spec_from_metadata(meta: dict[str, str], where: str) -> ModelSpec:
    """The validated model description in a checkpoint's metadata."""
    try:
        return ModelSpec.from_dict(metadata_json(meta, "cl_tool.model", where, {}, (dict,)))
    except BadInputError as exc:
        if exc.message.startswith(where):
            raise
        raise BadInputError(f"{where}: {exc.message[0].lower()}{exc.message[1:]}") from exc


def _valid_layout(layout: Any) -> bool:
    """A layout record of the right shape: lists of parameter and classifier names, a name → [shape, dtype] map."""
    return (
        isinstance(layout, dict)
        and isinstance(layout.get("parameters"), list)
        and isinstance(layout.get("classifier"), list)
        and isinstance(layout.get("tensors"), dict)
    )


def layout_from_metadata(meta: dict[str, str], where: str) -> dict[str, Any] | None:
    """The recorded layout (see :func:`model_layout`), or None for a checkpoint written before layouts were recorded."""
    layout = metadata_json(meta, "cl_tool.layout", where, None, (dict,))
    if layout is not None and not _valid_layout(layout):
        raise BadInputError(f"Checkpoint {where} has malformed metadata 'cl_tool.layout'; the file is damaged.")
    return layout


def layout_problem(layout: dict[str, Any], spec, header: dict[str, Any], where: str) -> str | None:
    """What is wrong between the recorded layout, the model description and a safetensors header (names, shapes,
    float or integer dtypes), or None; from the header alone, so no tensor is read."""
    if layout.get("spec") is not None and layout.get("spec") != spec_digest(spec):
        return f"Checkpoint {where}'s model metadata was changed after writing (it no longer matches its recorded layout); the file is damaged or was edited."
    for name, rec in layout["tensors"].items():
        if name not in header:
            return f"Checkpoint {where} lacks tensor {name!r} that its recorded layout lists; the file is damaged or was edited."
        if not isinstance(rec, list) or not rec or list(rec[0]) != list(header[name]["shape"]):
            return f"Tensor {name!r} in {where} has shape {header[name]['shape']}, not the one its recorded layout lists; the file is damaged or was edited."
        if len(rec) > 1 and (str(rec[1]).startswith(("float", "bfloat")) != (header[name]["dtype"] in FLOAT_CODES)):
            return f"Tensor {name!r} in {where} has dtype {header[name]['dtype']}, not the kind its recorded layout lists ({rec[1]}); the file is damaged."
    extra = [n for n in header if n not in layout["tensors"]]
    if extra:
        return f"Checkpoint {where} has tensor {extra[0]!r} that its recorded layout does not list; the file is damaged or was edited."
    unknown = [n for n in layout["parameters"] + layout["classifier"] if n not in layout["tensors"]]
    if unknown:
        return f"Checkpoint {where} has a malformed layout record (unknown tensor {unknown[0]!r}); the file is damaged."
    return None


def spec_digest(spec: ModelSpec) -> str:
    """A short digest of the model description, so a layout is only trusted together with the spec it was saved with."""
    import hashlib

    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def model_layout(model) -> dict[str, Any]:
    """What a model looks like, recorded in a checkpoint so that tools which only need names and shapes
    (prune) can validate the file and pick tensors without rebuilding the architecture:
    trainable parameter names, the classifier's parameter names, and name → [shape, dtype] of every tensor."""
    return {
        "parameters": [n for n, p in model.named_parameters() if p.requires_grad],
        "classifier": list(classifier_param_names(model)),
        "tensors": {n: [list(t.shape), str(t.dtype).replace("torch.", "")] for n, t in model.state_dict().items()},
    }


def validate_layout(ckpt: Checkpoint, tensors: dict[str, tuple[list[int], str]] | None = None) -> None:
    """Check the file's tensors (name → (shape, dtype name); default: ``ckpt.state``'s) against the layout recorded in its
    metadata, with the same rules and sentences as against the built model; reads no tensor data."""
    where = ckpt.path or "the checkpoint"
    if ckpt.layout.get("spec") != spec_digest(ckpt.spec):
        raise BadInputError(
            f"Checkpoint {where} describes a model that cannot be built as saved (its model metadata was changed after writing); the file is damaged or was not written by cl-tool."
        )
    got = tensors if tensors is not None else {n: (list(t.shape), dtype_name(t)) for n, t in ckpt.state.items()}
    _check_tensors(ckpt, {n: (list(shape), dtype) for n, (shape, dtype) in ckpt.layout["tensors"].items()}, got, where)
    missing = [n for n in ckpt.layout["parameters"] + ckpt.layout["classifier"] if n not in ckpt.layout["tensors"]]
    if missing:
        raise BadInputError(
            f"Checkpoint {where} has a malformed layout record (unknown tensor {missing[0]!r}); the file is damaged."
        )


def build_on_meta_device(ckpt: Checkpoint):
    """The model of ``ckpt`` built on the ``meta`` device (no memory, no init), validated against its tensors.

    Enough for parameter names, shapes and module types (e.g. to choose what to prune)
    without materialising a second copy of the weights.
    """
    import torch

    where = ckpt.path or "the checkpoint"
    try:
        with torch.device("meta"):
            model = build_model(ckpt.spec)
    except UsageError as exc:
        raise BadInputError(
            f"Checkpoint {where} describes a model that cannot be built ({exc.message.rstrip('.')}); the file is damaged or was not written by cl-tool."
        ) from exc
    _validate_state(ckpt, model.state_dict(), where)
    return model


def _validate_state(ckpt: Checkpoint, expected: dict[str, Any], where: str) -> None:
    """Every tensor the architecture needs (``expected``: a state dict) is in ``ckpt.state`` with the right shape and dtype kind."""
    _check_tensors(
        ckpt,
        {n: (list(t.shape), dtype_name(t)) for n, t in expected.items()},
        {n: (list(t.shape), dtype_name(t)) for n, t in ckpt.state.items()},
        where,
    )


def _check_tensors(
    ckpt: Checkpoint, expected: dict[str, tuple[list[int], str]], got: dict[str, tuple[list[int], str]], where: str
) -> None:
    """Every expected tensor present with its shape and a dtype of the same kind (float or not); nothing extra (exit 4)."""
    arch = ckpt.spec.arch
    for name, (shape, dtype) in expected.items():
        if name not in got:
            raise IncompatibleError(
                f"Checkpoint {where} lacks tensor {name!r} that architecture {arch} needs; it belongs to another model."
            )
        got_shape, got_dtype = got[name]
        if list(got_shape) != list(shape):
            raise IncompatibleError(
                f"Tensor {name!r} in {where} has shape {list(got_shape)}, but {arch} needs {list(shape)}; the file does not match its metadata."
            )
        if got_dtype != dtype and not (got_dtype in FLOAT_NAMES and dtype in FLOAT_NAMES):
            raise IncompatibleError(
                f"Tensor {name!r} in {where} has dtype torch.{got_dtype}, but {arch} needs torch.{dtype}."
            )
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        raise IncompatibleError(
            f"Checkpoint {where} has tensor {unexpected[0]!r} that architecture {arch} does not have; it belongs to another model."
        )


def instantiate(ckpt: Checkpoint):
    """Build the model described by ``ckpt.spec`` and load its tensors, validating names, shapes and dtypes."""
    where = ckpt.path or "the checkpoint"
    try:
        model = build_model(ckpt.spec)
    except UsageError as exc:  # the arguments came from the file's metadata, not from the command line
        raise BadInputError(
            f"Checkpoint {where} describes a model that cannot be built ({exc.message.rstrip('.')}); the file is damaged or was not written by cl-tool."
        ) from exc
    expected = model.state_dict()
    _validate_state(ckpt, expected, where)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ckpt.state.items()}, strict=True)
    return model


def load_model(path: str | os.PathLike) -> tuple[Checkpoint, Any]:
    """(Checkpoint, its model with the weights loaded) for a checkpoint file or timm folder, validated."""
    ckpt = load_checkpoint(path)
    return ckpt, instantiate(ckpt)


def history_entry(command: str, **fields: Any) -> dict[str, Any]:
    """One ``cl_tool.history`` entry: the command, cl-tool's version, the UTC time and the given fields (None left out)."""
    import datetime

    entry = {
        "command": command,
        "cl_tool": __version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    entry.update({k: v for k, v in fields.items() if v is not None})
    return entry


def grow_classifier(ckpt: Checkpoint, new_classes: int):
    """(model, grown names): ``ckpt``'s model rebuilt with ``new_classes`` outputs, every old tensor copied (the old rows of the head).

    ``ckpt.spec`` and ``ckpt.state`` are updated to the grown model.
    """
    spec = ckpt.spec
    if spec.arch == "mlp" and "sizes" in spec.kwargs:
        sizes = [int(s) for s in str(spec.kwargs["sizes"]).split(",")]
        sizes[-1] = new_classes
        spec.kwargs["sizes"] = ",".join(map(str, sizes))
    spec.num_classes = new_classes
    model = build_model(spec)
    new_state = model.state_dict()
    grown = []
    for name, old in ckpt.state.items():
        new = new_state[name]
        if tuple(new.shape) == tuple(old.shape):
            new_state[name] = old
        elif new.ndim == old.ndim and new.shape[1:] == old.shape[1:] and new.shape[0] > old.shape[0]:
            t = new.clone()
            t[: old.shape[0]] = old
            new_state[name] = t
            grown.append(name)
        else:
            raise IncompatibleError(
                f"$grow_head cannot map tensor {name!r} from {list(old.shape)} to {list(new.shape)}."
            )
    model.load_state_dict(new_state)
    ckpt.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, grown


def _dropped(entry: dict[str, Any]) -> int:
    n = entry.get("dropped_before")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _lineage_only(entry: dict[str, Any]) -> dict[str, Any]:
    """What lineage needs of a history entry: command, time, input fingerprint, grown tensors (short strings only)."""
    stub: dict[str, Any] = {"trimmed": True}
    for key in _LINEAGE_KEYS:
        v = entry.get(key)
        short_text = isinstance(v, str) and len(v) <= 64
        names = key == "grown" and isinstance(v, list) and all(isinstance(x, str) for x in v)
        if short_text or names:
            stub[key] = v
    if len(json.dumps(stub)) > STUB_BYTES:
        stub.pop("grown", None)
    if _dropped(entry):
        stub["dropped_before"] = _dropped(entry)
    return stub


def trim_history(history: list[Any]) -> list[dict[str, Any]]:
    """The history a written checkpoint records, bounded whatever its input carried (at most about 2 MB).

    The newest :data:`HISTORY_LIMIT` entries are kept whole, except one longer than :data:`ENTRY_BYTES` of JSON;
    that one and the older entries, up to :data:`LINEAGE_LIMIT` generations in all, keep only what lineage reads
    (command, time, input fingerprint, grown tensors) and ``"trimmed": true``. Entries older than that are
    dropped; their number is added to ``dropped_before`` of the oldest kept entry. So a sidecar of an ancestor
    up to LINEAGE_LIMIT generations back is still recognised, and ``info`` says how many entries are gone.
    """
    entries = [e if isinstance(e, dict) else {} for e in history]
    gone = entries[: max(0, len(entries) - LINEAGE_LIMIT)]
    kept = entries[len(gone) :]
    out = []
    for i, e in enumerate(kept):
        whole = i >= len(kept) - HISTORY_LIMIT and len(json.dumps(e)) <= ENTRY_BYTES
        out.append(e if whole else _lineage_only(e))
    dropped = len(gone) + sum(_dropped(e) for e in gone)
    if dropped and out:
        out[0] = {**out[0], "dropped_before": _dropped(out[0]) + dropped}
    return out


def save_checkpoint(
    path: str | os.PathLike,
    spec: ModelSpec,
    state: dict[str, Any],
    history: list[dict[str, Any]],
    *,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    layout: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically; return its fingerprint."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    fp = fingerprint(state)
    metadata = {
        "cl_tool.format": FORMAT_VERSION,
        "cl_tool.model": json.dumps(spec.to_dict()),
        "cl_tool.history": json.dumps(trim_history(history)),
        "cl_tool.fingerprint": fp,
        "cl_tool.extra": json.dumps(extra or {}),
    }
    if layout is not None:
        metadata["cl_tool.layout"] = json.dumps({**layout, "spec": spec_digest(spec)})
    save_tensors(path, state, metadata, force=force)
    return fp


# ----------------------------------------------------------------- what `cl-tool info` shows (header first)


def _finite_check(where):
    """A :func:`scan_tensors` check: :func:`nonfinite_text` for a floating-point tensor holding NaN or ±Inf."""
    return lambda name, t: nonfinite_text(where, name) if first_nonfinite({name: t}) is not None else None


def _read_tensors(path, header, params, where, info, problems, *, verify: bool, sparsity: bool, recorded=()) -> None:
    """``info --verify`` (the fingerprint and values of every tensor, compared with ``recorded``: (the fingerprint the
    file records, None if none) or () for a timm folder, which has no record) and ``--sparsity`` (zeros of ``params``)
    in one pass over the tensors, into ``info``."""
    if not (verify or sparsity):
        return
    scan = scan_tensors(
        path,
        list(header) if verify else list(params),
        fingerprint=verify,
        zeros=set(params) if sparsity else set(),
        check=_finite_check(where) if verify else None,
    )
    info["fingerprint"]["computed"] = scan["fingerprint"]
    if scan["problem"]:
        problems.append(scan["problem"])
    if verify and recorded:
        (recorded,) = recorded
        info["fingerprint"]["verified"] = scan["fingerprint"] == recorded and not scan["problem"]
        if recorded is None:
            problems.append(f"Checkpoint {where} records no fingerprint; it was not written completely by cl-tool.")
        elif scan["fingerprint"] != recorded:
            problems.append(
                f"Checkpoint {where}'s tensors do not match its recorded fingerprint (recorded {recorded}, computed {scan['fingerprint']}); "
                f"the file was changed after cl-tool wrote it."
            )
    if sparsity:
        info["sparsity"] = sparsity_record(scan["zeros"])


def describe(path: Path, header, meta, *, problems: list[str], verify: bool, sparsity: bool) -> dict[str, Any]:
    """What `cl-tool info` shows of a checkpoint: model, parameters, fingerprint, history, lineage, pruning record;
    ``verify``: the fingerprint recomputed, ``sparsity``: zeros per parameter. Problems found go to ``problems``."""
    where = str(path)
    spec = spec_from_metadata(meta, where)
    history = metadata_json(meta, "cl_tool.history", where, [], (list,))
    extra = metadata_json(meta, "cl_tool.extra", where, {}, (dict,))
    layout = layout_from_metadata(meta, where)
    info: dict[str, Any] = {"format": meta.get("cl_tool.format"), "model": spec.to_dict()}
    if layout is not None:
        problem = layout_problem(layout, spec, header, where)
        if problem:
            problems.append(problem)
        params = [n for n in layout["parameters"] if n in header]
        info["parameters"] = {
            "trainable": sum(numel(header[n]["shape"]) for n in params),
            "tensors": len(params),
            "classifier": list(layout["classifier"]),
        }
    else:
        params = [n for n, e in header.items() if e["dtype"] in FLOAT_CODES]
        info["parameters"] = None  # not recorded (older file): only the tensors are known
    recorded = meta.get("cl_tool.fingerprint")
    info["fingerprint"] = {"recorded": recorded, "computed": None, "verified": None}
    info.update(describe_history(history, entries=HISTORY_LIMIT, generations=LINEAGE_LIMIT))
    info["extra"] = extra
    pruning = extra.get("pruning") if isinstance(extra.get("pruning"), dict) else None
    info["pruning"] = (
        {k: pruning.get(k) for k in ("by", "scope", "requested_sparsity", "achieved_sparsity", "source")}
        if pruning
        else None
    )
    _read_tensors(path, header, params, where, info, problems, verify=verify, sparsity=sparsity, recorded=(recorded,))
    return info


def describe_timm_folder(folder: Path, *, verify: bool, sparsity: bool) -> dict[str, Any]:
    """What `cl-tool info` shows of a timm folder: the model its config.json describes and its weights' tensors."""
    spec, weights = timm_folder_spec(folder)
    header, _ = read_header(weights, "Checkpoint")
    info: dict[str, Any] = {
        "path": str(folder),
        "kind": "timm-folder",
        "file_bytes": weights.stat().st_size,
        "weights": str(weights),
        "tensors": tensor_summary(header),
        "problems": [],
        "model": spec.to_dict(),
        "parameters": None,
        "fingerprint": {"recorded": None, "computed": None, "verified": None},
        "history": [],
        "history_entries": 0,
        "history_dropped": 0,
        "lineage": [],
        "pruning": None,
    }
    floats = [n for n, e in header.items() if e["dtype"] in FLOAT_CODES]
    _read_tensors(weights, header, floats, weights, info, info["problems"], verify=verify, sparsity=sparsity)
    return info


def lineage_target(path: Path, verify: bool) -> dict[str, Any]:
    """What ``info --for`` needs of a checkpoint (or timm folder): fingerprint (recorded, or computed if ``verify`` or
    none is recorded), history, parameter names (None: not recorded) and tensor shapes; from the header where it can."""
    if path.is_dir():
        _, tensors_at = timm_folder_spec(path)
        header, _ = read_header(tensors_at, "Checkpoint")
        fp, history, params = None, [{"command": "import", "from": str(path)}], None
    else:
        header, meta = read_header(path, "--for checkpoint")
        if "cl_tool.model" not in meta:
            raise BadInputError(
                f"--for {path} is not a cl-tool checkpoint; give the checkpoint (or timm folder) that would use the file."
            )
        history = metadata_json(meta, "cl_tool.history", str(path), [], (list,))
        layout = layout_from_metadata(meta, str(path))
        tensors_at, fp, params = path, meta.get("cl_tool.fingerprint"), list(layout["parameters"]) if layout else None
    source = "recorded"
    if verify or not fp:
        fp, source = scan_tensors(tensors_at, list(header), fingerprint=True, zeros=set())["fingerprint"], "computed"
    return {
        "path": str(path),
        "fingerprint": fp,
        "fingerprint_from": source,
        "history": history,
        "params": params,
        "shapes": {n: list(e["shape"]) for n, e in header.items()},
    }
