"""Housekeeping of the decoded cache folder: list its files, remove them, keep the folder under a size cap.

A cache file (see :mod:`cl_tool.data.cache`, whose ``file_header`` reads the JSON header of every format)
is known here by that header only, and only the keys every version has are relied on (``n``, ``shape``, ``dtype``; ``parts.source`` and ``info.cache_source`` when
present), so files of other versions of the format are listed and evicted too.

Recency: a command that reads a cache file sets its modification time to now (:func:`mark_used`), so
the modification time is when the file was last written or read. The size cap is ``$CL_TOOL_CACHE_MAX``
(bytes, or with a K/M/G/T suffix, powers of 1024; ``0`` or ``none``: no cap), default
:data:`DEFAULT_MAX`; after a command writes a cache file, the least recently used other files are
removed until the folder fits (:func:`after_commit`). A file being read by another command when it is
removed stays readable by that command (POSIX keeps an open file); a later command decodes again.
No torch, numpy or datasets here.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_tool.data.cache import file_header
from cl_tool.errors import UsageError

SUFFIX = ".cltd"
DEFAULT_MAX = 50 << 30  # 50 GiB
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Entry:
    """One file of the cache folder; ``source``/``rows``/``shape``/``dtype`` are None when its header is unreadable."""

    path: Path
    bytes: int
    last_used: float  # seconds since the epoch (the file's modification time)
    source: str | None
    rows: int | None
    shape: list[int] | None
    dtype: str | None

    def record(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "bytes": self.bytes,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_used)),
            "source": self.source,
            "rows": self.rows,
            "shape": self.shape,
            "dtype": self.dtype,
        }


def parse_size(text: str, what: str) -> int | None:
    """``10G`` → 10·2³⁰ bytes; ``0``/``none`` → None (no cap). UsageError names ``what`` otherwise."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    if t in ("0", "NONE", ""):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)", t)
    if m is None:
        raise UsageError(f"{what} {text!r} is not a size; give bytes or a number with K, M, G or T (e.g. 20G), or 0.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_duration(text: str, what: str) -> float:
    """``7d`` → seconds (units s, m, h, d, w; a bare number is days). UsageError names ``what`` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if m is None:
        raise UsageError(f"{what} {text!r} is not a duration; give a number with s, m, h, d or w (e.g. 7d, 12h).")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "d"]


def cache_max() -> int | None:
    """The cap from ``$CL_TOOL_CACHE_MAX`` (None: no cap), else :data:`DEFAULT_MAX`."""
    text = os.environ.get("CL_TOOL_CACHE_MAX")
    return DEFAULT_MAX if text is None else parse_size(text, "$CL_TOOL_CACHE_MAX")


def _header(path: Path) -> dict[str, Any] | None:
    return file_header(path)


def _source(meta: dict[str, Any]) -> str | None:
    info, parts = meta.get("info"), meta.get("parts")
    if isinstance(info, dict) and isinstance(info.get("cache_source"), str):
        return info["cache_source"]
    if isinstance(parts, dict) and isinstance(parts.get("source"), str):
        return parts["source"]
    return None


def entries(folder: Path) -> list[Entry]:
    """The cache files (``*.cltd``, temporary files of running writers excluded) of ``folder``, oldest use first."""
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        path = Path(folder) / name
        try:
            st = path.stat()
        except OSError:
            continue
        meta = _header(path) or {}
        shape = meta.get("shape")
        out.append(
            Entry(
                path=path,
                bytes=st.st_size,
                last_used=st.st_mtime,
                source=_source(meta),
                rows=meta.get("n") if isinstance(meta.get("n"), int) else None,
                shape=list(shape) if isinstance(shape, list) else None,
                dtype=meta.get("dtype") if isinstance(meta.get("dtype"), str) else None,
            )
        )
    return sorted(out, key=lambda e: (e.last_used, e.path.name))


def remove(entry: Entry) -> bool:
    try:
        os.unlink(entry.path)
    except FileNotFoundError:
        return False  # another command removed it first
    return True


def evict(folder: Path, max_bytes: int, keep: Path | None = None) -> list[Entry]:
    """Remove the least recently used files until ``folder``'s cache files total ``max_bytes`` or less; ``keep`` stays."""
    files = entries(folder)
    total = sum(e.bytes for e in files)
    removed = []
    for e in files:
        if total <= max_bytes:
            break
        if keep is not None and e.path == Path(keep):
            continue
        if remove(e):
            removed.append(e)
        total -= e.bytes
    return removed


def mark_used(path: Path) -> None:
    """Record that a command read ``path`` now (its modification time: the cap evicts the least recently used)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def after_commit(path: Path) -> None:
    """Called when a command has written cache file ``path``: keep its folder under the cap (never fails)."""
    try:
        cap = cache_max()
    except UsageError:
        return  # a malformed $CL_TOOL_CACHE_MAX: the `cache` command says so; a command reading data goes on
    if cap is not None:
        with contextlib.suppress(OSError):
            evict(Path(path).parent, cap, keep=Path(path))
