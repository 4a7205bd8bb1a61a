"""Reading and writing safetensors files with careful validation and clear errors.

The header is parsed by hand first (8-byte little-endian length, then JSON), so a
truncated or foreign file gets one precise sentence instead of a library traceback.
Nothing here unpickles anything. torch is imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any

from cl_tool.atomic import atomic_path
from cl_tool.errors import BadInputError, OutputError

#: the floating-point dtypes: safetensors code → the name torch (and cl-tool's layout record) use
FLOAT_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
FLOAT_CODES = set(FLOAT_DTYPES)
FLOAT_NAMES = set(FLOAT_DTYPES.values())


def dtype_name(t: Any) -> str:
    """The dtype name (``float32``, ``int64``...) of a torch tensor, a numpy array or a ``pruning.TensorInfo``."""
    return str(t.dtype).removeprefix("torch.")


def is_float(t: Any) -> bool:
    return dtype_name(t) in FLOAT_NAMES


#: safetensors dtype codes → the names torch (and cl-tool's layout record) use (float8: see FLOAT_DTYPES)
DTYPE_NAMES = {
    **{c: n for c, n in FLOAT_DTYPES.items() if not c.startswith("F8")},
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (it refuses to open a longer header)
_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{what} {p} does not exist; check the path.")
    if p.is_dir():
        raise BadInputError(f"{what} {p} is a directory, not a file; give the .safetensors file inside it.")
    if not stat.S_ISREG(p.stat().st_mode):
        raise BadInputError(f"{what} {p} is not a regular file (a pipe or device); give a .safetensors file.")
    if p.stat().st_size == 0:
        raise BadInputError(f"{what} {p} is empty (0 bytes); it was not written completely, regenerate it.")
    if not os.access(p, os.R_OK):
        raise BadInputError(f"{what} {p} is not readable; check its permissions.")
    return p


def _whole(v: Any) -> bool:
    """A JSON whole number a u64 holds (not a float such as 4.0, not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor entry of a header (dtype, shape, data_offsets), as the safetensors reader judges it."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_SIZES:
        return f"has an unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(_whole(s) for s in shape):
        return "has a shape that is not a list of whole numbers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        return "has data_offsets that are not two whole numbers"
    start, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if end < start or end - start != numel * _DTYPE_SIZES[dtype]:
        return f"spans {end - start} bytes, not the {numel * _DTYPE_SIZES[dtype]} its dtype and shape need"
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key[:80]!r} appears twice")
        out[key] = value
    return out


def read_header(path: str | os.PathLike, what: str = "Input") -> tuple[dict[str, Any], dict[str, str]]:
    """Return (tensor entries, ``__metadata__``) of a safetensors file, validating its layout.

    The one header check of every reader (the in-memory load, the streaming prune, ``info``), as strict as the
    safetensors library: a length prefix of at most 100,000,000 bytes that fits in the file, a JSON object
    without repeated names, string-to-string metadata, and per tensor a known dtype, a shape and two data
    offsets of whole numbers whose difference is the shape's byte size; the tensors, in offset order, tile
    the data section exactly (no gap, no overlap, nothing after the last one).
    """
    p = check_input_file(path, what)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise BadInputError(
                f"{what} {p} is too short to be a safetensors file ({size} bytes); it is truncated or not safetensors."
            )
        (n,) = struct.unpack("<Q", prefix)
        if n == 0 or n > MAX_HEADER_BYTES:
            raise BadInputError(
                f"{what} {p} is not a safetensors file (invalid header length {n}); give a .safetensors file written by cl-tool or safetensors."
            )
        if 8 + n > size:
            raise BadInputError(
                f"{what} {p} is truncated: its header says {n} bytes but the file has {size - 8} after the length prefix; regenerate or re-download it."
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as exc:
        if "appears twice" in str(exc):
            raise BadInputError(f"{what} {p} is corrupt: in its header {exc}; regenerate it.") from exc
        raise BadInputError(
            f"{what} {p} is not a safetensors file (its header is not valid JSON); give a .safetensors file."
        ) from exc
    except RecursionError as exc:  # absurdly nested JSON
        raise BadInputError(
            f"{what} {p} is not a safetensors file (its header is not valid JSON); give a .safetensors file."
        ) from exc
    if not isinstance(header, dict):
        raise BadInputError(f"{what} {p} is not a safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadInputError(f"{what} {p} has malformed metadata (must map strings to strings).")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        problem = entry_problem(entry)
        if problem is not None:
            raise BadInputError(
                f"{what} {p} is corrupt: the header entry of tensor {name!r} is invalid (it {problem}); regenerate it."
            )
        start, end = entry["data_offsets"]
        if end > data_len:
            raise BadInputError(
                f"{what} {p} is truncated: tensor {name!r} extends past the end of the file; regenerate or re-download it."
            )
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            how = "overlaps the tensor before it" if start < at else f"leaves bytes {at} to {start} of the data unused"
            raise BadInputError(
                f"{what} {p} is corrupt: tensor {name!r} {how} (data offsets must tile the data section); regenerate it."
            )
        at = end
    if at != data_len:
        raise BadInputError(
            f"{what} {p} is corrupt: its tensors cover {at} of the {data_len} bytes after the header; regenerate it."
        )
    return header, metadata


def load_tensors(path: str | os.PathLike, what: str = "Input") -> tuple[dict[str, Any], dict[str, str]]:
    """Validate and load all tensors (on CPU) and the metadata of a safetensors file."""
    _, metadata = read_header(path, what)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(
            f"{what} {path} could not be read as safetensors ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); regenerate it."
        ) from exc
    return tensors, metadata


_SAFETENSORS_DTYPES = {n: c for c, n in {**DTYPE_NAMES, **FLOAT_DTYPES}.items()}  # torch name → code


def encode_header(header: dict[str, Any], path: str | os.PathLike) -> bytes:
    """The header as written: compact JSON padded with spaces to a multiple of 8 bytes (the data stays aligned).

    OutputError (exit 6) when it is longer than :data:`MAX_HEADER_BYTES`: the safetensors library (and
    :func:`read_header`) would refuse to open the file, so it is never written.
    """
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise OutputError(
            f"{path} would have a header of {len(raw):,} bytes, more than the {MAX_HEADER_BYTES:,} a safetensors "
            f"reader opens; its metadata (carried over from the input) is too large, so nothing was written."
        )
    return raw


def write_safetensors_file(tensors: dict[str, Any], filename: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write contiguous CPU tensors to ``filename`` in the safetensors format, straight from their memory.

    Layout as the safetensors library writes it: an 8-byte little-endian header length, the JSON
    header (``__metadata__`` plus name → dtype, shape, data_offsets) padded with spaces so the data
    starts 8-byte aligned, then the tensors back to back, ordered by descending item size and then
    name (each one stays aligned to its item size). Unlike ``safetensors.torch.save_file`` no copy
    of the tensors is made (it converts each one to ``bytes`` first), which matters for large models.
    I/O errors (disk full, ...) propagate as ``OSError``.
    """
    import torch

    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        kind = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if kind is None:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = encode_header(header, filename)
    with open(filename, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in order:
            t = tensors[name]
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str], *, force: bool) -> None:
    """Write tensors + metadata atomically (temp file in the same folder, fsync, rename)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, force=force) as tmp:
        write_safetensors_file(tensors, tmp, metadata)


def fingerprint(tensors: dict[str, Any]) -> str:
    """A 32-hex-digit XXH3-128 digest of names, dtypes, shapes and bytes of ``tensors`` (sorted by name).

    XXH3 hashes at memory speed (an 86 M-parameter model in well under a second); it detects
    accidental mismatches (another checkpoint, edited weights), it is not a cryptographic seal.
    """
    h = fingerprint_hasher()
    for name in sorted(tensors):
        fingerprint_update(h, name, tensors[name])
    return h.hexdigest()


def fingerprint_hasher():
    """A fresh hasher for :func:`fingerprint_update` (feed tensors sorted by name, then ``hexdigest()``)."""
    import xxhash

    return xxhash.xxh3_128()


def fingerprint_line(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    """What a fingerprint hashes before a tensor's bytes: its name, torch dtype name (``float32``) and shape."""
    return f"{name}|torch.{dtype}|{tuple(shape)};".encode()


def fingerprint_update(h, name: str, t) -> None:
    """Add one tensor to a fingerprint, exactly as :func:`fingerprint` does (so a file can be hashed one tensor at a time)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h.update(fingerprint_line(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def tensor_summary(header: dict[str, Any]) -> dict[str, Any]:
    """Counts, values and bytes of a file's tensors, in total and by dtype (from the header alone)."""
    by_dtype: dict[str, dict[str, int]] = {}
    for entry in header.values():
        d = by_dtype.setdefault(
            DTYPE_NAMES.get(entry["dtype"], entry["dtype"]), {"tensors": 0, "values": 0, "bytes": 0}
        )
        start, end = entry["data_offsets"]
        d["tensors"] += 1
        d["values"] += numel(entry["shape"])
        d["bytes"] += int(end) - int(start)
    return {
        "count": len(header),
        "values": sum(d["values"] for d in by_dtype.values()),
        "bytes": sum(d["bytes"] for d in by_dtype.values()),
        "by_dtype": by_dtype,
    }


def scan_tensors(path: Path, names: list[str], *, fingerprint: bool, zeros: set[str], check=None) -> dict[str, Any]:
    """One pass over the tensors ``names`` of ``path`` (sorted by name, one in memory at a time): the fingerprint of
    them all (if ``fingerprint``), the zero count of each in ``zeros``, and the first non-None ``check(name, t)``."""
    from safetensors import SafetensorError, safe_open

    h = fingerprint_hasher() if fingerprint else None
    counts: dict[str, dict[str, Any]] = {}
    problem = None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in sorted(names):
                t = f.get_tensor(name)
                if h is not None:
                    fingerprint_update(h, name, t)
                if name in zeros:
                    n = int(t.numel())
                    z = n - int(t.count_nonzero())
                    counts[name] = {"numel": n, "zeros": z, "fraction": z / n if n else 0.0}
                if check is not None and problem is None:
                    problem = check(name, t)
                del t
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(
            f"{path} could not be read as safetensors ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); regenerate it."
        ) from exc
    return {"fingerprint": h.hexdigest() if h is not None else None, "zeros": counts, "problem": problem}


def sparsity_record(counts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-tensor zero counts of :func:`scan_tensors` with their totals and the fraction of zeros."""
    n = sum(c["numel"] for c in counts.values())
    zeros = sum(c["zeros"] for c in counts.values())
    return {"tensors": counts, "numel": n, "zeros": zeros, "fraction": zeros / n if n else 0.0}
