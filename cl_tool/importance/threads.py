"""How many torch threads the importance engine uses for a batch on a CPU: all of them, or one where that is faster.

A batch's work (the forward pass, the backward passes to the layer outputs, the layer rules) is
hundreds of short parallel operations, the rules' cache-sized chunks of per-sample gradients
above all, and each ends with every thread waiting for the slowest. When another process keeps
a core busy, the thread that shares it is descheduled for whole time slices and holds up every
one of them, so one thread alone is faster; on a quiet machine all threads are. The load can
change during a run, so the count is chosen by timing batches (:class:`BatchThreads`):

* batches run on all threads, untimed, until they have taken :data:`WARMUP_SECONDS` in all;
* every later batch's time per sample is recorded for the count it ran on, and now and then one
  batch runs on the other count (a probe). On all threads, a probe of one thread is due right
  after the first timed batch, then after :data:`FIRST_INTERVAL`, twice as many, … batches while
  the choice stands (at most :data:`MAX_INTERVAL`), and at once when the time per sample rises
  above :data:`DRIFT` × its best recent time (that time then replaces its history); it runs
  only while other processes keep at least :data:`OTHERS_BUSY` of a CPU busy (or where that
  cannot be read), so a quiet machine pays nothing. On one thread, a probe of all threads comes
  on the same schedule and as soon as the other processes fall below that;
* a probe faster than :data:`MARGIN` × the chosen count's recent median becomes the choice.

Nothing is tuned on a single thread, on other devices, while torch's deterministic algorithms are
on (``--deterministic``), or on batches shorter than :data:`MIN_SECONDS` (noise). The thread count
changes how GEMMs and reductions split their sums, so runs that chose differently can differ in
the last bits (up to ~3e-6 relative, measured).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque

import torch

from cl_tool.importance.rules import count_batch_threads
from cl_tool.runtime import OthersBusy

WARMUP_SECONDS = 1.0
FIRST_INTERVAL = 8
MAX_INTERVAL = 256
MARGIN = 0.85
DRIFT = 1.5
MIN_SECONDS = 0.05
HISTORY = 3
OTHERS_BUSY = 0.5


class BatchThreads:
    """The torch thread count for each batch (see the module docstring).

    ``start_batch()``, then the batch's work inside ``with running():``, then ``end_batch(samples)``.
    ``threads``: all threads (default: torch's count now); ``enabled``: tune at all (a CPU);
    ``clock``: seconds; ``others``: CPUs other processes kept busy since its previous call, or None
    where unknown (default :class:`~cl_tool.runtime.OthersBusy`).
    """

    def __init__(self, threads: int | None = None, enabled: bool = True, clock=time.perf_counter, others=None):
        self.all = threads or torch.get_num_threads()
        self.enabled = enabled and self.all > 1 and not torch.are_deterministic_algorithms_enabled()
        self.choice = self.all
        self.clock = clock
        self.batch = 0
        self.warm = 0.0  # seconds of the warm-up batches so far
        self.next_probe: int | None = None  # the batch that probes the other count (after the first timed one)
        self.interval = FIRST_INTERVAL
        self.times: dict[int, deque] = {self.all: deque(maxlen=HISTORY), 1: deque(maxlen=HISTORY)}
        self.now = self.all
        self.probing = False
        self.seconds = 0.0
        self.others = others if others is not None else (OthersBusy() if self.enabled else lambda: None)
        self.busy: float | None = None  # CPUs the other processes kept busy during the last timed batch
        self.timed = False  # this batch is past the warm-up: its time and the others' load are read

    def _contended(self) -> bool:
        return self.busy is None or self.busy >= OTHERS_BUSY

    def start_batch(self) -> None:
        """Choose this batch's count: the choice, or the other count on a probe."""
        self.seconds = 0.0
        due = self.next_probe is not None and self.batch >= self.next_probe
        if self.choice == self.all:
            self.probing = self.enabled and due and self._contended()
        else:
            self.probing = self.enabled and (due or not self._contended())
        self.timed = self.enabled and self.warm >= WARMUP_SECONDS
        if self.timed:
            self.others()  # start the window of this batch (warm-up batches read nothing: /proc costs ~0.1 ms)
        other = 1 if self.choice == self.all else self.all
        self.now = other if self.probing else self.choice

    @contextlib.contextmanager
    def running(self):
        """Run the block on this batch's count (restoring torch's) and add its time to the batch's."""
        before = torch.get_num_threads()
        if self.now != before:
            torch.set_num_threads(self.now)
        start = self.clock()
        try:
            yield
        finally:
            self.seconds += self.clock() - start
            if self.now != before:
                torch.set_num_threads(before)

    def end_batch(self, samples: int) -> None:
        """Record the batch's time per sample and update the choice and the next probe."""
        self.batch += 1
        count_batch_threads(self.now)
        if not self.enabled or samples <= 0:
            return
        if not self.timed:
            self.warm += self.seconds
            return
        self.busy = self.others()
        if self.next_probe is None:
            self.next_probe = self.batch  # the batch after this first timed one
        if self.seconds < MIN_SECONDS:  # too short to time: look again later
            if self.probing:
                self.next_probe = self.batch + self.interval
            return
        t = self.seconds / samples
        chosen = self.times[self.choice]
        if self.probing:
            if chosen and t < MARGIN * statistics.median(chosen):
                self.choice = self.now  # and the schedule of probes starts again
                self.interval = FIRST_INTERVAL
            self.times[self.now].append(t)
            self.next_probe = self.batch + self.interval
            if chosen:
                self.interval = min(MAX_INTERVAL, self.interval * 2)
            return
        if chosen and t > DRIFT * min(chosen):  # the load changed: probe now, against this time alone
            chosen.clear()
            self.next_probe = self.batch
            self.interval = FIRST_INTERVAL
        chosen.append(t)
