"""Atomic, non-destructive file output, and the roles of every file a command touches.

Outputs are written to a hidden temporary file in the destination folder, flushed and
fsync'ed, then renamed over the destination, so a reader (or a later pipeline step) sees
either no file or the complete file, never a half-written one. A temporary file's name
carries the writer's process id and host (``.cl-tool-tmp-<pid>@<host>-<name>-<random>``), so
the next successful write into the same folder removes the leftovers of writers that were
killed (SIGKILL, power loss) and cannot have cleaned up after themselves.

:class:`FileRoles` is filled with every input and output of a command and checked before
any expensive work: no output may be an input (same path, a link to it, a hard link of it)
or lie inside an input folder (a timm folder, a ``--data`` folder), no two outputs may be
the same file, ``--force`` replaces existing outputs only, and every output's folder must
exist and be writable. An output is never written through a link: a symbolic link is refused
(its target could be an input, a system file, or change between the check and the rename), as
is a special file (a device, FIFO, socket, anything under /proc or /sys); a hard link's name is
replaced by the rename, its other names keep the old bytes. :func:`every_command_reads`
registers an input of every command run inside it (the file of ``cl-tool batch``). No torch
import here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cl_tool.errors import OutputError

TMP_PREFIX = ".cl-tool-tmp-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"(\d+)@([0-9a-f]{8})-")


def tmp_prefix(name: str) -> str:
    """Prefix of this process's temporary files for the destination ``name``."""
    return f"{TMP_PREFIX}{os.getpid()}@{_HOST}-{name}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a live process of another user
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove this host's ``.cl-tool-tmp-*`` files and folders in ``folder`` whose writer is no longer running.

    A writer that was killed before it could rename or delete its temporary file leaves it
    behind; its process id (in the name) is then not alive. Temporaries of live processes,
    of other hosts (a shared file system) and of unknown formats are left alone.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TMP_RE.match(entry.name)
            if m is None or m.group(2) != _HOST or _alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(entry.name)
    return removed


# ----------------------------------------------------------------------------------------------- file roles


@dataclass
class _File:
    path: Path
    role: str  # how the user named it: "--output", "the checkpoint", "--data", ...
    is_folder: bool = False  # a folder whose contents are read (timm folder, data folder)

    def identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def describe(self) -> str:
        return f"{self.role} {self.path}"


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare as given
        return p.absolute()


_AMBIENT_INPUTS: list[tuple[Path, str]] = []


@contextlib.contextmanager
def every_command_reads(path: str | os.PathLike | None, role: str) -> Iterator[None]:
    """Inside the block, ``path`` is an input of every :class:`FileRoles` (a batch file read by all its lines)."""
    if path is None:
        yield
        return
    _AMBIENT_INPUTS.append((Path(path), role))
    try:
        yield
    finally:
        _AMBIENT_INPUTS.pop()


_KERNEL_FOLDERS = (Path("/proc"), Path("/sys"))


def special_kind(path: Path) -> str | None:
    """What ``path`` is when it is neither a regular file, a folder, nor absent ("a device", "a FIFO", ...); else None.

    A symbolic link is judged by its target; any path under /proc or /sys (``/proc/self/fd/1``) is a kernel file.
    """
    for p in (path.absolute(), _resolved(path)):
        if any(p == k or p.is_relative_to(k) for k in _KERNEL_FOLDERS):
            return "a file of the kernel's /proc or /sys"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def refuse_links_and_special(path: Path, role: str) -> None:
    """OutputError (exit 6) when the output ``path`` is a special file or a symbolic link (see the module docstring)."""
    kind = special_kind(path)
    if kind is not None:
        raise OutputError(
            f"{role} {path} is not a regular file but {kind}; cl-tool writes outputs only to regular files: "
            f"give a file path."
        )
    if path.is_symlink():
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        raise OutputError(
            f"{role} {path} is a symbolic link{target}; cl-tool does not write through links: "
            f"give the path of the file itself, or remove the link."
        )


class FileRoles:
    """Every file a command reads and writes, checked together before any work.

    ``input()`` registers a file or folder the command reads; ``output()`` one it writes
    (``may_exist``: an output the command also reads, such as a resume state, which may exist
    without ``--force``). :meth:`check` raises :class:`OutputError` (exit 6) with one sentence
    naming both roles when an output would replace or alias an input or another output, when
    it exists without ``--force``, or when its folder is missing or not writable.
    """

    def __init__(self, *, force: bool):
        self.force = force
        self.inputs: list[_File] = []
        self.outputs: list[tuple[_File, bool]] = []
        for path, role in _AMBIENT_INPUTS:
            self.input(path, role)

    def input(self, path: str | os.PathLike | None, role: str) -> None:
        """Register an input; a folder's whole contents are protected. ``None`` and absent paths are ignored."""
        if path is None:
            return
        p = Path(path)
        if not os.path.lexists(p):
            return
        self.inputs.append(_File(p, role, is_folder=p.is_dir()))

    def output(
        self, path: str | os.PathLike | None, role: str, *, may_exist: bool = False, folder: bool = False
    ) -> None:
        """Register an output file (``folder``: an output folder, replaced as a whole)."""
        if path is not None:
            self.outputs.append((_File(Path(path), role, is_folder=folder), may_exist))

    def check(self) -> None:
        seen: list[_File] = []
        for out, may_exist in self.outputs:
            self._check_against_inputs(out)
            for other in seen:
                if _resolved(out.path) == _resolved(other.path) or (
                    out.identity() is not None and out.identity() == other.identity()
                ):
                    raise OutputError(
                        f"{out.role} and {other.role} both name {out.path}; give each output its own path."
                    )
            seen.append(out)
            self._check_writable(out, may_exist)

    def _check_against_inputs(self, out: _File) -> None:
        target = _resolved(out.path)
        ident = out.identity()
        for inp in self.inputs:
            same = target == _resolved(inp.path) or (ident is not None and ident == inp.identity())
            if same:
                raise OutputError(
                    f"{out.describe()} is also an input of this command ({inp.describe()}); cl-tool never overwrites "
                    f"an input, even with $force: choose another path for {out.role}."
                )
            if inp.is_folder and target.is_relative_to(_resolved(inp.path)):
                raise OutputError(
                    f"{out.describe()} lies inside {inp.describe()}, which this command reads; "
                    f"write outputs outside that folder."
                )
        if ident is not None and os.stat(out.path).st_nlink > 1:  # a hard link: look for its twin inside input folders
            for inp in self.inputs:
                if inp.is_folder and _contains_inode(inp.path, ident):
                    raise OutputError(
                        f"{out.describe()} is also an input of this command (a hard link to a file inside {inp.describe()}); "
                        f"cl-tool never overwrites an input, even with --force: choose another path for {out.role}."
                    )

    def _check_writable(self, out: _File, may_exist: bool) -> None:
        p = out.path
        refuse_links_and_special(p, out.role)
        if p.is_dir() and not out.is_folder:
            raise OutputError(f"{out.describe()} is a directory; give a file path.")
        if os.path.lexists(p) and not (self.force or may_exist):
            raise OutputError(f"{out.describe()} already exists; pass $force to overwrite it or choose another path.")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            if parent.exists():
                raise OutputError(
                    f"{out.describe()} cannot be written: {parent} is a file, not a folder; choose another path."
                )
            raise OutputError(f"The folder of {out.describe()} does not exist; create {parent} first.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"The folder {parent} of {out.describe()} is not writable; choose a writable location.")


def _contains_inode(folder: Path, ident: tuple[int, int]) -> bool:
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) == ident:
                    return True
    return False


def check_output(path: str | os.PathLike, *, force: bool, role: str = "--output", folder: bool = False) -> Path:
    """Check a single output with no inputs (see :class:`FileRoles`)."""
    roles = FileRoles(force=force)
    roles.output(path, role, folder=folder)
    roles.check()
    return Path(path)


# ----------------------------------------------------------------------------------------------- atomic writes


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


def _output_error(dest: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"No space left on the device while writing {dest}; free some space and run again (nothing was written)."
        )
    return OutputError(f"Could not write {dest}: {exc.strerror or exc}; nothing was written.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit fsync it and rename it into place.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    destination is untouched. ``force`` allows replacing an existing destination. After a
    successful rename, stale temporaries of killed writers in the same folder are removed.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=tmp_prefix(dest.name), dir=folder)
    except OSError as exc:
        raise OutputError(
            f"Cannot create a file in {folder} for {dest}: {exc.strerror}; choose a writable location."
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(
            OSError
        ):  # mkstemp (and the safetensors writer) make 0600 files; use what open() would
            os.chmod(tmp, 0o666 & ~_umask())
        if os.path.lexists(dest) and not force:
            raise OutputError(f"{dest} appeared while this command ran; pass $force to overwrite it.")
        refuse_links_and_special(dest, "The output")
        if dest.is_dir():
            raise OutputError(f"The output {dest} is a directory; give a file path.")
        os.replace(tmp, dest)
        _fsync_dir(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _output_error(dest, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    sweep_stale_temporaries(folder)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: yield a temporary folder path (not yet created) to fill."""
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        holder = Path(tempfile.mkdtemp(prefix=tmp_prefix(dest.name), dir=parent))
    except OSError as exc:
        raise OutputError(
            f"Cannot create a folder in {parent} for {dest}: {exc.strerror}; choose a writable location."
        ) from exc
    try:
        yield holder / "content"
        if os.path.lexists(dest):
            if not force:
                raise OutputError(f"{dest} appeared while this command ran; pass $force to overwrite it.")
            refuse_links_and_special(dest, "The output folder")
            if dest.is_dir():
                shutil.rmtree(dest)
            else:
                dest.unlink()
        (holder / "content").rename(dest)
        _fsync_dir(parent)
    except OSError as exc:
        raise _output_error(dest, exc) from exc
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    sweep_stale_temporaries(parent)


class LineFile:
    """A text output written line by line while a command runs (``--log-json``), renamed into place at the end.

    The lines go to a temporary file beside the destination (readable while the run goes on);
    :meth:`commit` fsyncs it and renames it over the destination; :meth:`discard` (or leaving
    the ``with`` block with an exception) removes it, so a failed run leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool):
        self.dest = Path(path)
        self.force = force
        self._ctx = atomic_path(self.dest, force=force)
        self.tmp = self._ctx.__enter__()
        self._fh = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in commit/discard
        self.done = False

    def write_line(self, text: str) -> None:
        self._fh.write(text + "\n")
        self._fh.flush()

    def commit(self) -> None:
        self.done = True
        self._fh.close()
        self._ctx.__exit__(None, None, None)

    def discard(self, exc: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._fh.close()
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("discarded"), None)

    def __enter__(self) -> LineFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard(exc)


@contextlib.contextmanager
def all_or_nothing(*line_files: LineFile | None) -> Iterator:
    """Publish several outputs together: yield ``wrote(path)`` to call after each output is in place.

    If a later write fails, the outputs already published by the block are removed again (and
    the ``line_files`` discarded), so a failed command leaves none of its outputs; on success
    the ``line_files`` are committed last.
    """
    written: list[Path] = []
    try:
        yield lambda path: written.append(Path(path))
        for lf in line_files:
            if lf is not None:
                lf.commit()
                written.append(lf.dest)
    except BaseException as exc:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        for lf in line_files:
            if lf is not None and not lf.done:
                lf.discard(exc)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> None:
    with atomic_path(path, force=force) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), force=force)
