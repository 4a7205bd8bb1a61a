"""Pruning a checkpoint file into a new file, piece by piece, with numpy (no torch).

For scores that need no forward pass — |w| or stored importances — pruning is I/O. Tensors are
read with ``os.pread`` in pieces of ``PIECE_BYTES`` into reused buffers (the file is never mapped, so
resident memory stays a few pieces, whatever the size of the checkpoint), in three reads of each selected
tensor:

1. every tensor: refuse NaN/±Inf, hash it into the checkpoint's fingerprint (lineage needs it) and,
   for magnitude, hand |w| to the :class:`~cl_tool.pruning.CutPlanner` (its first read: range and
   random sample); stored importances are handed over while their file is checked the same way;
2. the planner's second read: the scores in the sample's bracket are copied out and partitioned,
   which gives the exact cut (more counting reads only for heavy ties or a missed bracket);
3. the output: its header (the input's tensor entries, new metadata with a fixed-width
   placeholder for the fingerprint), then every tensor, masked where selected (magnitude from the
   bytes just read), written at its offset in name order while the output's fingerprint is hashed;
   the placeholder is filled in;
4. (``--mask-out``) the masks as uint8.

Masks, ties and the written bytes are exactly those of the in-memory path (``prune`` through
torch): a pruned element becomes +0.0 in its own dtype.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from cl_tool.errors import BadInputError
from cl_tool.pruning import CutPlanner, MaskPlan, Source
from cl_tool.safetensors_io import DTYPE_NAMES, FLOAT_CODES

NUMPY_DTYPES = {**DTYPE_NAMES, "BF16": "uint16"}  # bfloat16: numpy has none; its bits, as uint16
_RAW = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
_PLACEHOLDER = "0" * 32  # the output's fingerprint, filled in once the tensors are written
PIECE_BYTES = 4 << 20  # a tensor is read in pieces of this size: memory does not grow with the largest tensor


class Scratch:
    """Buffers reused from tensor to tensor, one per purpose, so that a read does not fault in fresh pages (a fresh
    buffer's page faults cost as much as the read itself; README "Pruning at I/O speed")."""

    def __init__(self):
        self._buffers: dict[str, object] = {}

    def array(self, purpose: str, count: int, dtype):
        """An uninitialised array of ``count`` elements of ``dtype``, valid until the next call for ``purpose``."""
        import numpy as np

        dtype = np.dtype(dtype)
        need = count * dtype.itemsize
        buf = self._buffers.get(purpose)
        if buf is None or buf.size < need:
            buf = self._buffers[purpose] = np.empty(max(need, 8), dtype=np.uint8)
        return buf[:need].view(dtype)


class TensorFile:
    """A safetensors file whose tensors are read with ``os.pread``, whole or in pieces of ``PIECE_BYTES``.

    A read returns a fresh array, or with ``reuse`` a view of the file's read buffer for that purpose, valid
    until the next read for the same purpose (the streaming passes hold one piece at a time).
    """

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
        self.scratch = Scratch()

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def itemsize(self, name: str) -> int:
        import numpy as np

        return np.dtype(NUMPY_DTYPES[self.header[name]["dtype"]]).itemsize

    def raw(self, name: str, start: int = 0, count: int | None = None, *, reuse: str | None = None):
        """Elements ``[start, start + count)`` of the tensor (all by default) as unsigned integers of its item size."""
        import numpy as np

        itemsize = self.itemsize(name)
        first, end = self.header[name]["data_offsets"]
        if count is None:
            count = (end - first) // itemsize - start
        dtype = _RAW[itemsize]
        buf = self.scratch.array(reuse, count, dtype) if reuse else np.empty(count, dtype=dtype)
        view, done, offset = memoryview(buf).cast("B"), 0, self.data_start + first + start * itemsize
        while done < count * itemsize:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise BadInputError(
                    f"{self.path} is truncated: tensor {name!r} ends past the end of the file; regenerate it."
                )
            done += got
        return buf

    def pieces(self, name: str, *, reuse: str = "read"):
        """``(start, raw)`` for consecutive pieces of the tensor (none for an empty one), in the ``reuse`` buffer."""
        numel, step = self.numel(name), max(1, PIECE_BYTES // self.itemsize(name))
        for start in range(0, numel, step):
            yield start, self.raw(name, start, min(step, numel - start), reuse=reuse)

    def decode(self, name: str, raw, scratch: Scratch | None = None):
        """Values from the bytes ``raw`` of tensor ``name``: a view, or for BF16 an exact float32 (in ``scratch``)."""
        import numpy as np

        code = self.header[name]["dtype"]
        if code != "BF16":
            return raw.view(NUMPY_DTYPES[code])
        wide = scratch.array("bf16", raw.size, np.uint32) if scratch is not None else np.empty(raw.size, np.uint32)
        np.copyto(wide, raw)
        wide <<= 16
        return wide.view(np.float32)


def magnitude(values, scratch: Scratch | None = None):
    """|w| in float32, as the in-memory path scores magnitude (float32 weights: into ``scratch``'s "scores" buffer)."""
    import numpy as np

    if scratch is not None and values.dtype == np.float32:
        return np.abs(values, out=scratch.array("scores", values.size, np.float32))
    return np.abs(values).astype(np.float32, copy=False)


def _header_line(tf: TensorFile, name: str) -> bytes:
    """What the fingerprint hashes before a tensor's bytes (as ``safetensors_io.fingerprint_update``)."""
    from cl_tool.safetensors_io import fingerprint_line

    return fingerprint_line(name, DTYPE_NAMES[tf.header[name]["dtype"]], tf.shape(name))


def check_and_fingerprint(tf: TensorFile, where: str, planner: CutPlanner | None = None) -> str:
    """Refuse a tensor holding NaN/±Inf (exit 3) and return the file's fingerprint (as ``safetensors_io.fingerprint``).

    With ``planner`` (magnitude pruning), the |w| of each of its sources is observed on the way (its first read).
    """
    import numpy as np

    from cl_tool.safetensors_io import fingerprint_hasher

    h = fingerprint_hasher()
    for name in sorted(tf.header):
        h.update(_header_line(tf, name))
        code = tf.header[name]["dtype"]
        observed = planner is not None and name in planner.sources
        for start, raw in tf.pieces(name):
            if code in FLOAT_CODES:
                values = tf.decode(name, raw, tf.scratch)
                if not np.isfinite(values).all():
                    raise BadInputError(
                        f"Checkpoint {where} has NaN or infinite values in {name!r}; it comes from a diverged run: use an earlier checkpoint."
                    )
                if observed:
                    planner.observe(name, magnitude(values, tf.scratch), start)
            h.update(raw.view(np.uint8).data)
    return h.hexdigest()


class Scores:
    """The scores of the checkpoint's tensors, read piece by piece (alongside the weights they score when written)."""

    def piece(self, name: str, start: int, count: int, weights):
        """Scores (float32, flat) of elements ``[start, start + count)`` of ``name``, whose weights are ``weights``."""
        raise NotImplementedError

    def pieces(self, name: str):
        """The scores of ``name``, flat, in consecutive pieces (each valid until the next)."""
        raise NotImplementedError

    def sources(self, names: list[str], shapes: dict[str, tuple[int, ...]]) -> list[Source]:
        """Sources (:class:`~cl_tool.pruning.Source`) over the scores, read in pieces (whole only on request)."""
        import numpy as np

        def whole(name: str):
            return np.concatenate([p.copy() for p in self.pieces(name)] or [np.zeros(0, np.float32)])

        return [Source(n, shapes[n], "float32", lambda n=n: whole(n), lambda n=n: self.pieces(n)) for n in names]


class MagnitudeScores(Scores):
    """|w|: computed from the weights themselves."""

    def __init__(self, tf: TensorFile):
        self.tf = tf

    def piece(self, name, start, count, weights):
        return magnitude(weights, self.tf.scratch)

    def pieces(self, name):
        for _, raw in self.tf.pieces(name, reuse="source"):
            yield magnitude(self.tf.decode(name, raw, self.tf.scratch), self.tf.scratch)


class SidecarScores(Scores):
    """Stored importances (checked by :func:`check_sidecar_values`) as float32; rows a grown head added since score 0."""

    def __init__(self, sc: TensorFile, shapes: dict[str, tuple[int, ...]], grown: set[str]):
        self.sc, self.shapes, self.grown = sc, shapes, grown

    def padded(self, name: str) -> bool:
        """Whether the stored importances of ``name`` are fewer than its elements (a head grown since)."""
        return name in self.grown and self.sc.shape(name) != self.shapes[name]

    def piece(self, name, start, count, weights=None):
        import numpy as np

        have = max(0, min(count, self.sc.numel(name) - start))
        values = self.sc.decode(name, self.sc.raw(name, start, have, reuse="scores"), self.sc.scratch)
        values = values.astype(np.float32, copy=False)
        if have == count:
            return values
        padded = self.sc.scratch.array("padded", count, np.float32)
        padded[:have] = values
        padded[have:] = 0
        return padded

    def pieces(self, name):
        numel, step = math.prod(self.shapes[name]), PIECE_BYTES // 4
        for start in range(0, numel, step):
            yield self.piece(name, start, min(step, numel - start))


class SaliencyScores(SidecarScores):
    """Ω·w² (float32): the stored importances times the squares of the weights they score, as the in-memory
    ``prune --rank saliency`` computes them (Ω and w in float32, then one float32 product each)."""

    def __init__(self, sc: TensorFile, tf: TensorFile, shapes: dict[str, tuple[int, ...]], grown: set[str]):
        super().__init__(sc, shapes, grown)
        self.tf, self.own = tf, Scratch()  # own buffers: the weights read here never clobber the writer's

    def piece(self, name, start, count, weights=None):
        import numpy as np

        if weights is None:
            weights = self.tf.decode(name, self.tf.raw(name, start, count, reuse="saliency"), self.own)
        omega = super().piece(name, start, count)
        w2 = np.square(weights.astype(np.float32, copy=False), out=self.own.array("w2", count, np.float32))
        return np.multiply(omega, w2, out=w2)


def check_sidecar_values(
    sc: TensorFile, where: str, planner: CutPlanner | None = None, scores: SidecarScores | None = None
) -> None:
    """Every importance finite and non-negative (exit 3 naming the first bad tensor; ``sidecar.value_problem``).

    With ``planner`` and ``scores``, each of the planner's sources whose importances are all stored is observed on
    the way (its first read); a grown tensor is left to the planner.
    """
    import numpy as np

    from cl_tool.sidecar import value_problem

    for name in sc.header:
        observed = planner is not None and scores is not None and name in planner.sources and not scores.padded(name)
        for start, raw in sc.pieces(name):
            values = sc.decode(name, raw, sc.scratch)
            problem = value_problem(name, values, where, np.isfinite)
            if problem is not None:
                raise BadInputError(problem)
            if observed:
                planner.observe(name, values.astype(np.float32, copy=False), start)


def write_pruned(
    tf: TensorFile,
    plan: MaskPlan,
    scores: Scores,
    selected: set[str],
    output: str | os.PathLike,
    metadata: dict[str, str],
    *,
    force: bool,
) -> str:
    """Write ``tf``'s tensors to ``output`` (atomically), the ``selected`` ones masked by ``plan``; return the output's
    fingerprint.

    ``metadata`` is the output's ``__metadata__``; its ``cl_tool.fingerprint`` is filled in here. Tensor entries, dtypes,
    shapes and data offsets are the input's. Each piece is read once, scored (``scores``), masked, written and hashed.
    """
    import numpy as np

    from cl_tool.atomic import atomic_path
    from cl_tool.safetensors_io import encode_header, fingerprint_hasher

    header = {"__metadata__": {**metadata, "cl_tool.fingerprint": _PLACEHOLDER}, **tf.header}
    raw_header = encode_header(header, output)
    marker = f'"cl_tool.fingerprint":"{_PLACEHOLDER}"'.encode()
    at = raw_header.index(marker) + len(marker) - len(_PLACEHOLDER) - 1
    data_start = 8 + len(raw_header)
    h = fingerprint_hasher()
    with atomic_path(output, force=force) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, struct.pack("<Q", len(raw_header)) + raw_header, 0)
            for name in sorted(tf.header):  # name order, so the fingerprint is hashed as the tensors are written
                h.update(_header_line(tf, name))
                offset = data_start + tf.header[name]["data_offsets"][0]
                keep = plan.keeper(name) if name in selected else None
                for start, raw in tf.pieces(name):
                    if keep is not None:
                        piece_scores = scores.piece(name, start, raw.size, tf.decode(name, raw, tf.scratch))
                        # the bits times 0 or 1: +0.0 in every float dtype where pruned
                        raw *= keep(piece_scores, tf.scratch.array("keep", raw.size, bool))
                    _pwrite_all(fd, raw, offset + start * raw.itemsize)
                    h.update(raw.view(np.uint8).data)
            fp = h.hexdigest()
            _pwrite_all(fd, fp.encode(), 8 + at)
        finally:
            os.close(fd)
    return fp


def write_masks(
    plan: MaskPlan, sources: list[Source], path: str | os.PathLike, metadata: dict[str, str], *, force: bool
) -> None:
    """The keep-masks as uint8 (1 keep, 0 pruned) in a safetensors file, one piece at a time."""
    import numpy as np

    from cl_tool.atomic import atomic_path
    from cl_tool.safetensors_io import encode_header

    entries, offset = {}, 0
    for src in sorted(sources, key=lambda s: s.name):
        entries[src.name] = {"dtype": "U8", "shape": list(src.shape), "data_offsets": [offset, offset + src.numel]}
        offset += src.numel
    raw_header = encode_header({"__metadata__": metadata, **entries}, path)
    with atomic_path(path, force=force) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, struct.pack("<Q", len(raw_header)) + raw_header, 0)
            position = 8 + len(raw_header)
            for src in sorted(sources, key=lambda s: s.name):
                keep = plan.keeper(src.name)
                for piece in src.pieces() if src.pieces is not None else [src.load()]:
                    position += _pwrite_all(fd, keep(piece).view(np.uint8), position)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> int:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked); return its length."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return len(view)
