"""How many torch threads the layer rules use on a CPU: all of them, or one where that is faster.

The rules' work in a batch is hundreds of short parallel operations (the cache-sized chunks of
per-sample gradients), and each ends with every thread waiting for the slowest. When another
process keeps a core busy, the thread that shares it is descheduled for whole time slices and
holds up every one of them, so one thread alone is faster; on a quiet machine all threads are.
(On 2 cores, the paper CNN's rules for 2,048 samples: 2.2 s on one thread against 3.6–4.8 s on
two with one core kept busy; 2.0 s against 1.2–1.6 s quiet.) The load can change during a run,
so the count is chosen by timing the rules, batch by batch (:class:`RuleThreads`):

* the first :data:`WARMUP` batches run on all threads and are not timed;
* every later batch's rule time per sample is recorded for the count it ran on, and now and then
  one batch runs on the other count (a probe): right after the first timed batch, then after
  :data:`FIRST_INTERVAL`, twice as many, … batches while the choice stands (at most
  :data:`MAX_INTERVAL`), and at the next batch when the chosen count's time per sample rises
  above :data:`DRIFT` × its best recent time;
* a probe faster than :data:`MARGIN` × the chosen count's recent median becomes the choice.

Nothing is tuned on a single thread, on other devices, while torch's deterministic algorithms are
on (``--deterministic``), or on batches whose rules take under :data:`MIN_SECONDS` (noise): the
thread count changes how GEMMs and reductions split their sums, so results can differ in the last
bits (relative ~1e-7) between runs that chose differently.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter, deque

import torch

WARMUP = 1
FIRST_INTERVAL = 8
MAX_INTERVAL = 256
MARGIN = 0.85
DRIFT = 1.5
MIN_SECONDS = 0.02
HISTORY = 3

_LOGS: list[Counter] = []


@contextlib.contextmanager
def logging_threads():
    """``with logging_threads() as counts:`` counts, per torch thread count, the batches whose rules ran on it."""
    counts: Counter = Counter()
    _LOGS.append(counts)
    try:
        yield counts
    finally:
        _LOGS.remove(counts)


def describe(counts: Counter) -> str:
    """One log line from :func:`logging_threads`' counts ('' if none)."""
    if not counts:
        return ""
    parts = ", ".join(f"{n} on {k} thread{'s' if k > 1 else ''}" for k, n in sorted(counts.items(), reverse=True))
    return f"importance rules: batches by torch threads: {parts}"


class RuleThreads:
    """The torch thread count for the rules of each batch (see the module docstring).

    ``start_batch()``, then every rule call inside ``with running():``, then ``end_batch(samples)``.
    ``threads``: all threads (default: torch's count now); ``enabled``: tune at all (a CPU);
    ``clock``: seconds (for tests).
    """

    def __init__(self, threads: int | None = None, enabled: bool = True, clock=time.perf_counter):
        self.all = threads or torch.get_num_threads()
        self.enabled = enabled and self.all > 1 and not torch.are_deterministic_algorithms_enabled()
        self.choice = self.all
        self.clock = clock
        self.batch = 0
        self.next_probe = WARMUP + 1
        self.interval = FIRST_INTERVAL
        self.times: dict[int, deque] = {self.all: deque(maxlen=HISTORY), 1: deque(maxlen=HISTORY)}
        self.now = self.all
        self.probing = False
        self.seconds = 0.0

    def start_batch(self) -> None:
        """Choose this batch's count: the choice, or the other count on a probe."""
        self.seconds = 0.0
        self.probing = self.enabled and self.batch == self.next_probe
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
        """Record the batch's rule time per sample and update the choice and the next probe."""
        b, self.batch = self.batch, self.batch + 1
        for counts in _LOGS:
            counts[self.now] += 1
        if not self.enabled or b < WARMUP or samples <= 0:
            return
        if self.seconds < MIN_SECONDS:  # too short to time: look again later
            if self.probing:
                self.next_probe = self.batch + self.interval
            return
        t = self.seconds / samples
        chosen = self.times[self.choice]
        if self.probing:
            if chosen and t < MARGIN * statistics.median(chosen):
                self.choice = self.now
                self.interval = FIRST_INTERVAL
            elif chosen:
                self.interval = min(MAX_INTERVAL, self.interval * 2)
            self.times[self.now].append(t)
            self.next_probe = self.batch + self.interval
            return
        if chosen and t > DRIFT * min(chosen):
            self.next_probe = self.batch
            self.interval = FIRST_INTERVAL
        chosen.append(t)
