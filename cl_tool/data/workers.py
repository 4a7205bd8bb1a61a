"""The DataLoader worker processes of a task, and what keeps them well-behaved: signals, dead workers, exit.

Workers are forked with SIGINT/SIGTERM blocked (:class:`_signals_blocked`) and then ignore both, so that a Ctrl-C
interrupts the command, not a worker; a worker that dies (killed, out of memory) becomes one sentence
(:func:`as_worker_error`), also when torch reports it from its SIGCHLD handler (:func:`_install_sigchld_guard`);
at exit the workers of every open task are stopped before multiprocessing would wait for them (:func:`track`).
A map-style task keeps its workers across passes (:class:`Workers`), a stream starts them per pass
(:func:`data_loader`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from cl_tool.errors import BadInputError, ClToolError, EnvironmentProblem, IncompatibleError, OutputError, UsageError

_OPEN: weakref.WeakSet = weakref.WeakSet()  # open tasks, closed at exit
_EXIT_HOOK = False


def _close_open_tasks() -> None:
    """Stop worker processes before multiprocessing's exit handler joins them (they ignore SIGTERM, so its terminate() would not).

    Open tasks are closed; then any daemonic child still alive (the workers of a task dropped without
    ``close()``) is killed, as multiprocessing would terminate it at exit, had it not to ignore SIGTERM.
    """
    for task in list(_OPEN):
        try:
            task.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    import multiprocessing  # at exit only: not imported at start-up

    for child in multiprocessing.active_children():
        if child.daemon:  # a DataLoader worker of a task dropped without close(): it would never be joined
            try:
                child.kill()
                child.join(timeout=5)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass


def _register_exit_hook() -> None:
    """Register after multiprocessing (imported with the DataLoader) so this runs before its exit handler (atexit is LIFO)."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        import multiprocessing.util  # noqa: F401 - make sure its handler is registered first

        atexit.register(_close_open_tasks)
        _EXIT_HOOK = True


def default_workers(cpus: int | None = None, local_ranks: int | None = None) -> int:
    """DataLoader workers per process by default: W = min(8, ⌊C / L⌋) for C usable CPUs and L processes on this host
    (torchrun's ``LOCAL_WORLD_SIZE``, else 1): the CPUs shared evenly, at most 8 per process; 0 (decode in the
    process itself) when W < 2, i.e. a process has fewer than 2 CPUs.

    Why not one CPU less: the command's own process mostly waits (for the accelerator, or for decoded batches); its
    CPU work per batch (uint8 → float32, the cache write, a light model) is a fraction of the decoding, and a worker
    that is ahead by ``prefetch_factor`` batches sleeps, so W = ⌊C / L⌋ keeps every CPU decoding on a first pass
    without taking CPU from a heavy model later (the decoding itself is the same work for any W)."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    if local_ranks is None:
        try:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_ranks = 1
    local_ranks = max(1, local_ranks)
    per = cpus // local_ranks
    return min(8, per) if per >= 2 else 0


def as_worker_error(exc: BaseException) -> ClToolError | None:
    """The one-sentence error for a DataLoader worker that died (killed, out of memory), or None for other errors."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and "DataLoader worker" in text:
        first = text.strip().splitlines()[0].strip().rstrip(".")
        first = first.replace("DataLoader worker", "worker").replace(" is killed by signal:", " was killed by signal")
        return EnvironmentProblem(
            f"A data-loading process died ({first}), often because the machine ran out of memory; "
            f"rerun with fewer $workers (or $workers 0)."
        )
    return None


_ERRORS = {cls.__name__: cls for cls in (BadInputError, IncompatibleError, UsageError, EnvironmentProblem, OutputError)}


def raise_worker_error(err: tuple[str, str]) -> None:
    """Raise the error a worker sent back as (class name, message)."""
    cls_name, message = err
    raise _ERRORS.get(cls_name, BadInputError)(message)


def _install_sigchld_guard() -> None:
    """torch raises RuntimeError from its SIGCHLD handler when a worker dies; make that our one-sentence error."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if not callable(handler) or getattr(handler, "_cl_tool_guard", False):
        return

    def guard(signum, frame):
        try:
            handler(signum, frame)
        except RuntimeError as exc:
            err = as_worker_error(exc)
            if err is None:
                raise
            raise err from None

    guard._cl_tool_guard = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, guard)


@contextlib.contextmanager
def _signals_blocked(active: bool):
    """Block SIGINT/SIGTERM in this thread while worker processes start (they inherit the mask, ignore both, then unblock).

    Without it a Ctrl-C that reaches the process group while a worker is starting kills the
    worker instead of interrupting the command. Signals that arrive meanwhile are delivered to
    this process when the block ends.
    """
    if not (active and hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Feed:
    """The DataLoader's sampler: yields the requests of the current pass (set before each iteration)."""

    def __init__(self):
        self._it: Iterator = iter(())

    def set(self, requests: Iterator) -> None:
        self._it = requests

    def __iter__(self):  # DataLoader may call iter() more than once when it builds an iterator; all get the same pass
        return self._it


def track(task) -> None:
    """Close ``task`` (stopping its workers) at exit if it is still open then."""
    _OPEN.add(task)


def data_loader(dataset, workers: int, *, pin: bool, sampler=None, persistent: bool = False):
    """A DataLoader of ``dataset`` (each item a whole batch) with ``workers`` processes (0: in this process)."""
    import torch  # not at the top: `cl-tool --help` imports no torch
    from torch.utils.data import DataLoader

    from cl_tool.data._fetch import identity, worker_init

    kw: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": identity,
        "pin_memory": pin,
        "generator": torch.Generator(),
    }
    if workers:
        kw.update(prefetch_factor=2, worker_init_fn=worker_init, **({"persistent_workers": True} if persistent else {}))
    _register_exit_hook()
    return DataLoader(dataset, batch_size=None, sampler=sampler, **kw)


def shut_down(loader) -> None:
    """Stop the worker processes of ``loader``'s iterator, if it has started any."""
    it = getattr(loader, "_iterator", None) if loader is not None else None
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


class Workers:
    """The persistent workers of a map-style task: one DataLoader fed by :class:`_Feed`, kept while the device kind
    (pinned copies or not) stays and it has the source when a pass needs it."""

    def __init__(self, n: int):
        self.n = n
        self.loader = None
        self.key: tuple | None = None
        self.feed: _Feed | None = None

    def map_loader(self, make_fetcher, *, pin: bool, source: bool):
        """The DataLoader for a pass (``source``: its workers must read the source); started anew when needed."""
        if self.loader is not None and self.key[0] == pin and (self.key[1] or not source):
            return self.loader
        self.close()
        self.feed = _Feed()
        self.loader = data_loader(make_fetcher(), self.n, pin=pin, sampler=self.feed, persistent=True)
        self.key = (pin, source)
        return self.loader

    def close(self) -> None:
        loader, self.loader, self.key = self.loader, None, None
        shut_down(loader)

    def iterate(self, loader) -> Iterator[Any]:
        """The worker results of ``loader``; a dead worker is :func:`as_worker_error`'s sentence (workers stopped)."""
        with _signals_blocked(self.n > 0):  # workers are forked with SIGINT/SIGTERM blocked until they ignore them
            it = iter(loader)
        if self.n:
            _install_sigchld_guard()
        while True:
            try:
                res = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:
                err = as_worker_error(exc)
                if err is None:
                    raise
                self.close()
                raise err from None
            except EnvironmentProblem:
                self.close()
                raise
            yield res
