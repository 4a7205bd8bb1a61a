"""Atomic, non-destructive file output.

Outputs are written to a hidden temporary file in the destination folder, flushed and
fsync'ed, then renamed over the destination, so a reader (or a later pipeline step) sees
either no file or the complete file, never a half-written one. ``check_output`` is called
before any expensive work so a job does not train for an hour and then refuse to write.
No torch import here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from cl_tool.errors import OutputError

TMP_PREFIX = ".cl-tool-tmp-"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = (), option: str = "--output") -> Path:
    """Validate that ``path`` may be written; raise OutputError with one sentence if not."""
    out = Path(path)
    for inp in inputs:
        if inp is not None and _same_file(out, Path(inp)):
            raise OutputError(f"{option} {out} is also an input of this command; choose another output path so the input is not destroyed.")
    if out.is_dir():
        raise OutputError(f"{option} {out} is a directory; give a file path.")
    if out.exists() and not force:
        raise OutputError(f"{option} {out} already exists; pass --force to overwrite it or choose another path.")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(f"{option} {out} cannot be written: {parent} is a file, not a folder; choose another path.")
        raise OutputError(f"The folder of {option} {out} does not exist; create {parent} first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"The folder {parent} of {option} {out} is not writable; choose a writable location.")
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit fsync it and rename it into place.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    destination is untouched. ``force`` allows replacing an existing destination.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + dest.name + ".", dir=folder)
    except OSError as exc:
        raise OutputError(f"Cannot create a file in {folder} for {dest}: {exc.strerror}; choose a writable location.") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # mkstemp (and the safetensors writer) make 0600 files; use what open() would
            os.chmod(tmp, 0o666 & ~_umask())
        if dest.exists() and not force:
            raise OutputError(f"{dest} appeared while this command ran; pass --force to overwrite it.")
        os.replace(tmp, dest)
        _fsync_dir(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"No space left on the device while writing {dest}; free some space and run again (nothing was written).") from exc
        raise OutputError(f"Could not write {dest}: {exc.strerror or exc}; nothing was written.") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> None:
    with atomic_path(path, force=force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), force=force)
