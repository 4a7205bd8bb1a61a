"""The decoded cache: a task's pixels after geometry (uint8, or float32 for non-8-bit arrays), filled by the first pass.

Before augmentation, task transforms and normalisation, so every command and every
``--permute``/``--rotate``/``--invert`` task of the same source shares it.

One file per (source, selection, columns, pixel scale, ``Preprocess.key()``) in the cache folder
(``$cache_dir``, else ``$CL_TOOL_CACHE``, else ``$XDG_CACHE_HOME/cl-tool/decoded`` or
``~/.cache/cl-tool/decoded``), named by the SHA-256 of that key (a local source's key holds
``sources.local_signature``: every file's path, size, mtime, inode and ctime)::

    [0, 8)            magic b"CLTDEC02"
    [8, 16)           header length (little-endian u64)
    [16, 32)          checksum: xxh3_128 of the header bytes followed by every byte from 65536 to the end
    [32, ...)         the header (JSON: key parts, n, shape, dtype, info, offsets)
    [65536, +n·row)   the rows, row i at 65536 + i·row_bytes (fixed size: read back with os.pread, never mmap)
    then              labels (int64 × n), status (uint8 × n: 1 decoded, 2 undecodable), the undecodable rows' messages (JSON)

A file is used only when its key matches, its length is the header's and its checksum holds;
the checksum is verified once when the file is opened (one sequential read of the file, which a
file small enough to be held in memory needs anyway). A file of this key that fails a check is
damaged: ``Store.load`` raises ``CacheDamaged``, the command decodes again and the new file
replaces it. Files of an older format (another magic) are ignored.

The rows are written (pwrite at their offset, in whatever order the first pass visits them;
in one sequential write at the end when the task is also held in memory; the kernel is asked to start writing each
run to disk at once) into a temporary file beside the destination whose name carries the writer's pid (see
``cl_tool.atomic``); when every row has been seen it is fsync'ed and renamed into place, so a
reader sees no file or a complete one. Concurrent writers each write their own temporary
file; the last rename wins and both files are complete and identical. An interrupted pass
(exception, signal, a command that reads only part of the task) removes its temporary file
on close/exit; a killed writer's file is swept by the next writer. Nothing is ever written
into the data folder. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

MAGIC = b"CLTDEC02"
HEAD = 32  # magic, header length, checksum
DATA_OFFSET = 1 << 16
SUFFIX = ".cltd"
RAM_BUDGET = 256 << 20  # a task whose decoded pixels fit this stays in memory; larger ones are read per batch
DISK_RESERVE = 1 << 30  # auto leaves at least this much free space (plus 10 % of the file)
CACHE_MODES = ("auto", "ram", "disk", "none")


#: Where each format's JSON header starts (format 1, before checksums, is only listed and evicted, never read).
HEADER_AT = {b"CLTDEC01": 16, MAGIC: HEAD}


def file_header(path) -> dict[str, Any] | None:
    """The JSON header of a cache file of any format (None: not a cache file, or unreadable); nothing verified."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            start = HEADER_AT.get(head[:8])
            n = int.from_bytes(head[8:16], "little") if len(head) == 16 else -1
            if start is None or not 0 <= n <= DATA_OFFSET - start:
                return None
            f.seek(start)
            meta = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


class CacheDamaged(Exception):
    """A cache file of the wanted key exists but fails its checks (length, checksum, header): it is not used."""


def _checksum():
    import xxhash

    return xxhash.xxh3_128()


def _hash_file_range(fd: int, h, start: int, stop: int, chunk: int = 16 << 20) -> None:
    """Feed bytes [start, stop) of ``fd`` to ``h`` in chunks (one reused buffer); OSError on a short read."""
    buf = bytearray(min(chunk, max(0, stop - start)) or 1)
    view = memoryview(buf)
    off = start
    while off < stop:
        k = os.preadv(fd, [view[: min(len(buf), stop - off)]], off)
        if k <= 0:
            raise OSError(f"short read at {off}")
        h.update(view[:k])
        off += k


def default_cache_dir() -> Path:
    env = os.environ.get("CL_TOOL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cl-tool" / "decoded"


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _canon(parts: dict[str, Any]) -> Any:
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def folder_writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def space_for(folder: Path, nbytes: int, *, reserve: bool) -> bool:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return free >= nbytes + (int(0.1 * nbytes) + DISK_RESERVE if reserve else 0)


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


_SYNC_FILE_RANGE: list[Any] = []  # [the libc function, or None where there is none], looked up once


def _start_write_back(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing bytes [offset, offset + nbytes) of ``fd`` to disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the rows of a first pass go to disk while it decodes, so the
    fsync at commit has little left to wait for. Durability still comes from that fsync; elsewhere a no-op."""
    if not _SYNC_FILE_RANGE:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _SYNC_FILE_RANGE.append(fn)
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves it to the fsync


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        b = os.pread(fd, min(size - got, 1 << 28), offset + got)
        if not b:
            raise OSError(f"short read at {offset + got}")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _runs(sorted_idx):
    """Split sorted unique indices into runs of consecutive values: [(start_pos, end_pos)]."""
    import numpy as np

    if len(sorted_idx) == 0:
        return []
    cuts = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    bounds = [0, *cuts.tolist(), len(sorted_idx)]
    return list(zip(bounds[:-1], bounds[1:]))


_FDS: dict[str, int] = {}


def _fd_for(paths) -> int:
    """An fd for the first of ``paths`` that opens (the temporary file, then the final one after its rename)."""
    last: OSError | None = None
    for p in paths:
        if not p:
            continue
        fd = _FDS.get(p)
        if fd is not None:
            return fd
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            last = exc
            continue
        _FDS[p] = fd
        return fd
    raise last or OSError("no cache file")


def read_rows(paths, shape, dtype: str, indices):
    """Rows ``indices`` of a cache file as a numpy array (k, *shape), read with pread (contiguous runs coalesced)."""
    import numpy as np

    dt = np.dtype(dtype)
    row = int(math.prod(shape)) * dt.itemsize
    idx = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(idx), *shape), dtype=dt)
    if len(idx) == 0:
        return out
    fd = _fd_for(paths)
    uniq, inverse = np.unique(idx, return_inverse=True)
    buf = np.empty((len(uniq), *shape), dtype=dt)
    flat = buf.reshape(len(uniq), -1).view(np.uint8).reshape(len(uniq), row)
    for a, b in _runs(uniq):
        data = _pread_exact(fd, (b - a) * row, DATA_OFFSET + int(uniq[a]) * row)
        flat[a:b] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, row)
    out[:] = buf[inverse.reshape(-1)]
    return out


def _cleanup(holder: dict) -> None:
    fd, tmp = holder.get("fd"), holder.get("tmp")
    holder["fd"] = holder["tmp"] = None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class Store:
    """Decoded rows of one task: status per row, an optional in-memory copy, an optional cache file.

    ``status[i]``: 0 not yet decoded, 1 decoded (in RAM and/or the file), 2 undecodable
    (``bad[i]`` is its one-sentence message).
    """

    def __init__(
        self,
        n: int,
        shape,
        *,
        labels,
        info: dict[str, Any],
        parts: dict[str, Any] | None,
        want_ram: bool,
        final: Path | None,
        ram_budget: int = RAM_BUDGET,
    ):
        import numpy as np

        self.n, self.shape = int(n), tuple(int(v) for v in shape)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.info, self.parts = dict(info), parts
        self.status = np.zeros(self.n, dtype=np.uint8)
        self.bad: dict[int, str] = {}
        self.filled = 0
        self.dtype: str | None = None
        self.ram = None
        self.want_ram, self.ram_budget = want_ram, ram_budget
        self.final = final
        self.committed = False
        self.file_complete = False  # ``final`` is a complete cache file
        self.disk_error: str | None = None
        self._holder: dict[str, Any] = {"fd": None, "tmp": None}
        self._finalizer = weakref.finalize(self, _cleanup, self._holder)

    # ------------------------------------------------------------------------------------------- reading an existing file

    @classmethod
    def load(cls, path: Path, parts: dict[str, Any], *, want_ram: bool, ram_budget: int = RAM_BUDGET) -> Store | None:
        """A complete cache file as a Store (its rows in RAM when they fit ``ram_budget``), or None when there is none.

        None: no file, or a file of another format. CacheDamaged (its one-line reason): a file of
        this format whose header, length or checksum is wrong.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return cls._load(fd, path, parts, want_ram, ram_budget)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheDamaged(f"unreadable: {exc}") from exc
        finally:
            os.close(fd)

    @classmethod
    def _load(cls, fd: int, path: Path, parts, want_ram: bool, ram_budget: int) -> Store | None:
        import numpy as np

        head = os.pread(fd, HEAD, 0)
        if head[:8] != MAGIC:
            return None  # not a cache file of this format: ignored (and replaced when a new one is written)
        if len(head) != HEAD:
            raise CacheDamaged("truncated header")
        hlen = int.from_bytes(head[8:16], "little")
        if hlen > DATA_OFFSET - HEAD:
            raise CacheDamaged("bad header length")
        raw = _pread_exact(fd, hlen, HEAD)
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise CacheDamaged("header is not JSON") from exc
        if not isinstance(meta, dict) or meta.get("parts") != _canon(parts):
            raise CacheDamaged("its header does not match its name")  # the name is the hash of the parts
        size = os.fstat(fd).st_size
        if size != meta["end"]:
            raise CacheDamaged(f"{size} bytes instead of {meta['end']}: truncated or extended")
        n, shape, dtype = int(meta["n"]), tuple(meta["shape"]), str(meta["dtype"])
        h = _checksum()
        h.update(raw)
        rows_end = DATA_OFFSET + n * int(math.prod(shape)) * np.dtype(dtype).itemsize
        ram = None
        if want_ram and rows_end - DATA_OFFSET <= ram_budget:
            ram = np.empty((n, *shape), dtype=np.dtype(dtype))
            flat = ram.reshape(-1).view(np.uint8)
            off = 0
            while off < len(flat):
                k = os.preadv(fd, [memoryview(flat[off : off + (1 << 28)])], DATA_OFFSET + off)
                if k <= 0:
                    raise CacheDamaged("short read")
                off += k
            h.update(memoryview(flat))
        else:
            _hash_file_range(fd, h, DATA_OFFSET, rows_end)
        tail = _pread_exact(fd, meta["end"] - rows_end, rows_end) if meta["end"] > rows_end else b""
        h.update(tail)
        if h.digest() != head[16:32]:
            raise CacheDamaged("checksum mismatch")
        labels = np.frombuffer(tail, dtype=np.int64, count=n, offset=meta["labels_offset"] - rows_end).copy()
        st = cls(
            n,
            shape,
            labels=labels,
            info=meta.get("info", {}),
            parts=parts,
            want_ram=want_ram,
            final=path,
            ram_budget=ram_budget,
        )
        st.status = np.frombuffer(tail, dtype=np.uint8, count=n, offset=meta["status_offset"] - rows_end).copy()
        bad_at = meta["bad_offset"] - rows_end
        st.bad = {int(k): v for k, v in json.loads(tail[bad_at : bad_at + meta["bad_length"]] or b"{}").items()}
        st.dtype, st.filled, st.committed, st.file_complete = dtype, n, True, True
        if not ((st.status == 1) | (st.status == 2)).all():
            raise CacheDamaged("rows missing")
        st.ram = ram
        return st

    # ------------------------------------------------------------------------------------------- state

    @property
    def row_bytes(self) -> int:
        import numpy as np

        return int(math.prod(self.shape)) * np.dtype(self.dtype or "uint8").itemsize

    @property
    def complete(self) -> bool:
        return self.filled >= self.n

    @property
    def on_disk(self) -> bool:
        """Rows marked decoded can be read from a file (the temporary one while filling without RAM copy, the final one after)."""
        return self.file_complete or (self._holder["fd"] is not None and self.ram is None)

    def file_paths(self) -> tuple[str | None, str | None]:
        tmp = self._holder["tmp"]
        return (str(tmp) if tmp else None, str(self.final) if self.final else None)

    # ------------------------------------------------------------------------------------------- filling

    def _start(self, dtype: str) -> None:
        import numpy as np

        self.dtype = dtype
        size = self.n * self.row_bytes
        if self.want_ram and size <= self.ram_budget:
            self.ram = np.empty((self.n, *self.shape), dtype=np.dtype(dtype))
        if self.final is not None:
            folder = self.final.parent
            try:
                if not space_for(folder, DATA_OFFSET + size + 9 * self.n, reserve=False):
                    raise OSError(28, "No space left on device")
                from cl_tool.atomic import sweep_stale_temporaries, tmp_prefix

                sweep_stale_temporaries(folder)
                fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(self.final.name), dir=folder)
                self._holder["fd"], self._holder["tmp"] = fd, tmp
                os.ftruncate(fd, DATA_OFFSET + size)
            except OSError as exc:
                self.drop_disk(f"cannot create a cache file in {folder} ({exc.strerror or exc})")

    def put(self, idx, x) -> bool:
        """Record decoded rows ``x`` (k, *shape) for task rows ``idx``; False (and the store is unusable) on a pixel-type change."""
        import numpy as np

        dtype = str(x.dtype)
        if self.dtype is None:
            self._start(dtype)
        elif dtype != self.dtype:
            return False
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return True
        if len(idx) == 1 or bool((np.diff(idx) > 0).all()):  # increasing (a pass in order): the rows as they are
            uniq, rows = idx, np.ascontiguousarray(x)
        else:
            uniq, first = np.unique(idx, return_index=True)
            rows = np.ascontiguousarray(x[first])
        new = int(np.count_nonzero(self.status[uniq] == 0))
        if self.ram is not None:
            if uniq[-1] - uniq[0] == len(uniq) - 1:  # one run of consecutive rows: a slice copy
                self.ram[uniq[0] : uniq[-1] + 1] = rows
            else:
                self.ram[uniq] = rows
        fd = self._holder["fd"]
        if fd is not None and self.ram is None:  # with an in-memory copy the file is written in one go at commit
            try:
                flat = rows.reshape(len(uniq), -1).view(np.uint8)
                for a, b in _runs(uniq):
                    _pwrite_all(fd, flat[a:b], DATA_OFFSET + int(uniq[a]) * self.row_bytes)
                    _start_write_back(fd, DATA_OFFSET + int(uniq[a]) * self.row_bytes, (b - a) * self.row_bytes)
            except OSError as exc:
                self.drop_disk(f"writing the cache file failed ({exc.strerror or exc})")
        if self.ram is None and self._holder["fd"] is None:
            return True  # nothing holds rows: keep status 0 so they are decoded again
        self.status[uniq] = np.where(self.status[uniq] == 2, 2, 1)
        self.filled += new
        if self.complete:
            self.commit()
        return True

    def mark_bad(self, rows, messages) -> None:
        import numpy as np

        rows = [int(r) for r in rows]
        if not rows:
            return
        arr = np.asarray(rows, dtype=np.int64)
        new = int(np.count_nonzero(self.status[arr] == 0))
        for r, m in zip(rows, messages):
            self.bad[r] = m
        self.status[arr] = 2
        self.filled += new
        if self.complete and self.dtype is not None:
            self.commit()

    def drop_disk(self, reason: str) -> None:
        """Stop writing the cache file (keep the in-memory rows)."""
        self.disk_error = reason
        self.final = None
        _cleanup(self._holder)
        self.file_complete = False
        if self.ram is None:  # the rows marked decoded lived only in the file
            self.status[self.status == 1] = 0
            self.filled = int((self.status == 2).sum())
            self.committed = False

    def commit(self) -> None:
        """Write labels, status and header; fsync; rename the temporary file into place."""
        import numpy as np

        fd, tmp = self._holder["fd"], self._holder["tmp"]
        if fd is None or self.final is None:  # RAM only: complete is enough
            self.committed = True
            return
        try:
            end = DATA_OFFSET + self.n * self.row_bytes
            labels_off, status_off = end, end + 8 * self.n
            bad = json.dumps({str(k): v for k, v in sorted(self.bad.items())}).encode()
            bad_off = status_off + self.n
            meta = {
                "format": "cl-tool decoded cache 2",
                "parts": _canon(self.parts or {}),
                "n": self.n,
                "shape": list(self.shape),
                "dtype": self.dtype,
                "info": self.info,
                "labels_offset": labels_off,
                "status_offset": status_off,
                "bad_offset": bad_off,
                "bad_length": len(bad),
                "end": bad_off + len(bad),
            }
            header = json.dumps(meta).encode()
            if len(header) > DATA_OFFSET - HEAD:
                raise OSError(0, "header too large")
            h = _checksum()
            h.update(header)
            if self.ram is not None:
                flat = self.ram.reshape(-1).view(np.uint8)
                for off in range(0, len(flat), 1 << 26):
                    _pwrite_all(fd, flat[off : off + (1 << 26)], DATA_OFFSET + off)
                    _start_write_back(fd, DATA_OFFSET + off, min(1 << 26, len(flat) - off))
                h.update(memoryview(flat))
            else:  # rows were written at their offsets as they came: hash them back from the file
                _hash_file_range(fd, h, DATA_OFFSET, end)
            tail = (
                np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()
                + np.ascontiguousarray(self.status, dtype=np.uint8).tobytes()
                + bad
            )
            _pwrite_all(fd, tail, labels_off)
            h.update(tail)
            _pwrite_all(fd, MAGIC + len(header).to_bytes(8, "little") + h.digest() + header, 0)
            os.fsync(fd)
            mask = os.umask(0o022)
            os.umask(mask)
            os.fchmod(fd, 0o666 & ~mask)
            os.replace(tmp, self.final)
        except OSError as exc:
            self.drop_disk(f"finishing the cache file failed ({exc.strerror or exc})")
            self.committed = self.ram is not None
            return
        with contextlib.suppress(OSError):
            dfd = os.open(self.final.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        self._holder["tmp"] = None  # renamed: nothing to remove
        _cleanup(self._holder)
        self.committed = self.file_complete = True
        from cl_tool.data.cache_admin import after_commit

        after_commit(self.final)  # the folder's size cap: least recently used files go

    def close(self) -> None:
        """Remove an unfinished temporary file (an interrupted or partial first pass leaves no cache)."""
        _cleanup(self._holder)
