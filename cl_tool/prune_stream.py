"""Pruning a checkpoint file into a new file, one tensor at a time, with numpy (no torch).

For scores that need no forward pass — |w| or stored importances — pruning is I/O. Tensors are
read with ``os.pread`` into a buffer of their own size (the file is never mapped, so resident
memory stays about one tensor, not the checkpoint), in four passes over the page cache:

1. every tensor: refuse NaN/±Inf and compute the checkpoint's fingerprint (lineage needs it);
2. the scores of the selected tensors: the exact cut (:func:`cl_tool.pruning.plan_masks`, a few
   counting passes);
3. the output: its header (the input's tensor entries, new metadata with a fixed-width
   placeholder for the fingerprint), then every tensor, masked where selected, written at its
   offset in name order while the output's fingerprint is hashed; the placeholder is filled in;
4. (``--mask-out``) the masks as uint8.

Masks, ties and the written bytes are exactly those of the in-memory path (``prune`` through
torch): a pruned element becomes +0.0 in its own dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from cl_tool.errors import BadInputError
from cl_tool.pruning import MaskPlan, Source
from cl_tool.safetensors_io import DTYPE_NAMES

NUMPY_DTYPES = {**DTYPE_NAMES, "BF16": "uint16"}  # bfloat16: numpy has none; its bits, as uint16
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_RAW = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
_PLACEHOLDER = "0" * 32  # the output's fingerprint, filled in once the tensors are written


class TensorFile:
    """A safetensors file whose tensors are read one at a time, each with ``os.pread`` into its own buffer."""

    def __init__(self, path: str | os.PathLike, what: str):
        from cl_tool.safetensors_io import read_header

        self.path = Path(path)
        self.header, self.metadata = read_header(self.path, what)
        unsupported = next((n for n, e in self.header.items() if e["dtype"] not in NUMPY_DTYPES), None)
        if unsupported is not None:
            raise NotImplementedError(f"dtype {self.header[unsupported]['dtype']} of {unsupported!r}")
        with open(self.path, "rb") as fh:
            self.data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def raw(self, name: str):
        """The tensor's bytes as a flat array of unsigned integers of its item size (BF16 as uint16)."""
        import numpy as np

        entry = self.header[name]
        start, end = entry["data_offsets"]
        itemsize = np.dtype(NUMPY_DTYPES[entry["dtype"]]).itemsize
        buf = np.empty((end - start) // itemsize, dtype=_RAW[itemsize])
        view, done = memoryview(buf).cast("B"), 0
        while done < end - start:
            got = os.preadv(self.fd, [view[done:]], self.data_start + start + done)
            if got <= 0:
                raise BadInputError(
                    f"{self.path} is truncated: tensor {name!r} ends past the end of the file; regenerate it."
                )
            done += got
        return buf

    def values(self, name: str):
        """The tensor's values, flat: its own numpy dtype, except BF16, which is widened exactly to float32."""
        import numpy as np

        raw = self.raw(name)
        code = self.header[name]["dtype"]
        if code == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.view(NUMPY_DTYPES[code])


def check_and_fingerprint(tf: TensorFile, where: str) -> str:
    """Refuse a tensor holding NaN/±Inf (exit 3) and return the file's fingerprint (as ``safetensors_io.fingerprint``)."""
    import numpy as np

    from cl_tool.safetensors_io import fingerprint_hasher

    h = fingerprint_hasher()
    for name in sorted(tf.header):
        raw = tf.raw(name)
        code = tf.header[name]["dtype"]
        if (
            code in FLOAT_CODES
            and raw.size
            and not np.isfinite(tf.values(name) if code == "BF16" else raw.view(NUMPY_DTYPES[code])).all()
        ):
            raise BadInputError(
                f"Checkpoint {where} has NaN or infinite values in {name!r}; it comes from a diverged run: use an earlier checkpoint."
            )
        h.update(f"{name}|torch.{DTYPE_NAMES[code]}|{tf.shape(name)};".encode())
        if raw.size:
            h.update(raw.view(np.uint8).data)
    return h.hexdigest()


def magnitude_sources(tf: TensorFile, names: list[str]) -> list[Source]:
    """|w| in float32, as the in-memory path scores magnitude."""
    import numpy as np

    return [Source(n, tf.shape(n), "float32", lambda n=n: np.abs(tf.values(n)).astype(np.float32)) for n in names]


def check_sidecar_values(sc: TensorFile, where: str) -> None:
    """Every importance finite and non-negative (exit 3 naming the first bad tensor), as ``sidecar.load_sidecar`` checks."""
    import numpy as np

    for name in sc.header:
        values = sc.values(name)
        if not np.isfinite(values).all():
            raise BadInputError(
                f"Importance of {name!r} in {where} contains NaN or Inf; recompute it (lower $lr or check the data) instead of using it."
            )
        if (values < 0).any():
            raise BadInputError(
                f"Importance of {name!r} in {where} has negative values; importances must be non-negative, recompute it."
            )


def sidecar_sources(
    sc: TensorFile, names: list[str], shapes: dict[str, tuple[int, ...]], grown: set[str], where: str
) -> list[Source]:
    """Stored importances (checked by :func:`check_sidecar_values`) as float32 scores; rows a grown head added since score 0."""
    import numpy as np

    def load(name: str):
        values = sc.values(name).astype(np.float32)
        stored = sc.shape(name)
        if name in grown and stored != shapes[name] and stored[1:] == shapes[name][1:] and stored[0] < shapes[name][0]:
            padded = np.zeros(math.prod(shapes[name]), dtype=np.float32)
            padded[: values.size] = values
            return padded
        return values

    return [Source(n, shapes[n], "float32", lambda n=n: load(n)) for n in names]


def write_pruned(
    tf: TensorFile,
    plan: MaskPlan,
    sources: dict[str, Source],
    output: str | os.PathLike,
    metadata: dict[str, str],
    *,
    force: bool,
) -> str:
    """Write ``tf``'s tensors to ``output`` (atomically), the ``sources``' tensors masked by ``plan``; return the output's fingerprint.

    ``metadata`` is the output's ``__metadata__``; its ``cl_tool.fingerprint`` is filled in here. Tensor entries, dtypes,
    shapes and data offsets are the input's.
    """
    import numpy as np

    from cl_tool.atomic import atomic_path
    from cl_tool.safetensors_io import fingerprint_hasher

    header = {"__metadata__": {**metadata, "cl_tool.fingerprint": _PLACEHOLDER}, **tf.header}
    raw_header = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw_header += b" " * (-len(raw_header) % 8)
    marker = f'"cl_tool.fingerprint":"{_PLACEHOLDER}"'.encode()
    at = raw_header.index(marker) + len(marker) - len(_PLACEHOLDER) - 1
    data_start = 8 + len(raw_header)
    h = fingerprint_hasher()
    with atomic_path(output, force=force) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, struct.pack("<Q", len(raw_header)) + raw_header, 0)
            for name in sorted(tf.header):  # name order, so the fingerprint is hashed as the tensors are written
                raw = tf.raw(name)
                if name in sources:
                    raw[~plan.mask(sources[name]).reshape(-1)] = 0  # +0.0 in every float dtype
                _pwrite_all(fd, raw, data_start + tf.header[name]["data_offsets"][0])
                h.update(f"{name}|torch.{DTYPE_NAMES[tf.header[name]['dtype']]}|{tf.shape(name)};".encode())
                if raw.size:
                    h.update(raw.view(np.uint8).data)
            fp = h.hexdigest()
            _pwrite_all(fd, fp.encode(), 8 + at)
        finally:
            os.close(fd)
    return fp


def write_masks(
    plan: MaskPlan, sources: list[Source], path: str | os.PathLike, metadata: dict[str, str], *, force: bool
) -> None:
    """The keep-masks as uint8 (1 keep, 0 pruned) in a safetensors file, one tensor at a time."""
    import numpy as np

    from cl_tool.atomic import atomic_path

    entries, offset = {}, 0
    for src in sorted(sources, key=lambda s: s.name):
        entries[src.name] = {"dtype": "U8", "shape": list(src.shape), "data_offsets": [offset, offset + src.numel]}
        offset += src.numel
    raw_header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    raw_header += b" " * (-len(raw_header) % 8)
    with atomic_path(path, force=force) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, struct.pack("<Q", len(raw_header)) + raw_header, 0)
            position = 8 + len(raw_header)
            for src in sorted(sources, key=lambda s: s.name):
                position += _pwrite_all(fd, plan.mask(src).astype(np.uint8).tobytes(), position)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> int:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked); return its length."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return len(view)
