"""The importance engine's choice of torch threads per batch (cl_tool.importance.threads), on a fake clock."""

from __future__ import annotations

import pytest
import torch

from cl_tool.importance import importance_sums
from cl_tool.importance import threads as T
from cl_tool.importance.rules import logging_chunks
from cl_tool.importance.threads import BatchThreads
from tests.conftest import torch_threads


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Others:
    """CPUs other processes keep busy during batch ``batch`` (set by :func:`run`): ``busy_on(batch)``."""

    def __init__(self, busy_on):
        self.busy_on, self.batch, self.calls = busy_on, 0, 0

    def __call__(self):
        self.calls += 1
        return self.busy_on(self.batch)


def run(tuner: BatchThreads, clock: Clock, seconds_on, batches: int, samples: int = 100) -> list[int]:
    """Feed ``batches`` batches whose time is ``seconds_on(batch, threads)``; the thread count each ran on."""
    used = []
    for b in range(batches):
        if isinstance(tuner.others, Others):
            tuner.others.batch = b
        tuner.start_batch()
        with tuner.running():
            used.append(torch.get_num_threads())
            clock.t += seconds_on(b, torch.get_num_threads())
        tuner.end_batch(samples)
    return used


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def test_unknown_load_keeps_all_threads_and_probes_ever_more_rarely(two_threads):
    clock = Clock()
    tuner = BatchThreads(clock=clock, others=Others(lambda b: None))
    used = run(tuner, clock, lambda b, k: 0.5 if k == 2 else 0.8, 60)
    # warm-up: batches 0-1 (1 s); batch 2 the first timed one; probes at 3, then after 8, 16, 32 batches
    assert [b for b, k in enumerate(used) if k == 1] == [3, 12, 29]
    assert torch.get_num_threads() == 2  # restored after every batch


def test_warm_up_batches_do_not_read_the_load(two_threads):
    """The others' load is read (at a batch's start and end) only for timed batches, not in the warm-up."""
    clock = Clock()
    others = Others(lambda b: None)
    tuner = BatchThreads(clock=clock, others=others)
    run(tuner, clock, lambda b, k: 0.4, 3)  # 1.2 s of warm-up
    assert others.calls == 0
    run(tuner, clock, lambda b, k: 0.4, 2)
    assert others.calls == 4


@pytest.mark.parametrize("busy", [None, 1.0], ids=["load-unknown", "core-busy"])
def test_busy_core_moves_to_one_thread_at_the_first_probe(two_threads, busy):
    clock = Clock()
    tuner = BatchThreads(clock=clock, others=Others(lambda b: busy))
    used = run(tuner, clock, lambda b, k: 1.2 if k == 2 else 0.8, 30)
    assert used[:3] == [2, 2, 1]  # warm-up (one batch of 1.2 s), one timed batch, the probe
    # from then on one thread, with the other count probed after 8 and 16 batches
    assert [b for b, k in enumerate(used) if k == 2 and b > 2] == [11, 28]
    assert torch.get_num_threads() == 2


def test_load_that_starts_mid_run_is_noticed_at_the_next_batch(two_threads):
    clock = Clock()
    tuner = BatchThreads(clock=clock, others=Others(lambda b: None))

    def seconds(b, k):
        busy = b >= 20
        return (1.3 if busy else 0.5) if k == 2 else 0.8

    used = run(tuner, clock, seconds, 30)
    assert used[20] == 2 and used[21] == 1  # the slow batch 20 makes batch 21 a probe, which wins
    assert all(k == 1 for k in used[21:])


def test_a_probe_within_the_margin_does_not_switch(two_threads):
    clock = Clock()
    tuner = BatchThreads(clock=clock, others=Others(lambda b: None))
    used = run(tuner, clock, lambda b, k: 0.5 if k == 2 else 0.5 * (T.MARGIN + 0.02), 20)
    assert sum(k == 1 for k in used) == 2  # the probes only


def test_a_quiet_machine_is_never_probed(two_threads):
    """Other processes below half a CPU: no batch runs on one thread, even one that would be faster."""
    clock = Clock()
    tuner = BatchThreads(clock=clock, others=Others(lambda b: 0.1))
    assert set(run(tuner, clock, lambda b, k: 0.5 if k == 2 else 0.3, 60)) == {2}


def test_back_to_all_threads_as_soon_as_the_other_process_ends(two_threads):
    clock = Clock()
    tuner = BatchThreads(clock=clock, others=Others(lambda b: 1.0 if b < 20 else 0.0))

    def seconds(b, k):
        return (1.2 if b < 20 else 0.5) if k == 2 else 0.8

    used = run(tuner, clock, seconds, 30)
    assert used[:3] == [2, 2, 1] and set(used[3:11]) == {1}
    assert used[20] == 1 and used[21] == 2  # batch 20 saw no other load: batch 21 probes all threads, which win
    assert set(used[21:]) == {2}


@pytest.mark.parametrize("case", ["disabled", "one-thread", "deterministic", "short-batches"])
def test_no_tuning(case, two_threads):
    clock = Clock()
    if case == "one-thread":
        torch.set_num_threads(1)
    if case == "deterministic":
        torch.use_deterministic_algorithms(True)
    try:
        tuner = BatchThreads(clock=clock, enabled=case != "disabled", others=Others(lambda b: None))
        fast_one = (lambda b, k: 1 / 64) if case == "short-batches" else (lambda b, k: 1.0 if k > 1 else 0.1)
        used = run(tuner, clock, fast_one, 200 if case == "short-batches" else 20)
    finally:
        torch.use_deterministic_algorithms(False)
    if case == "short-batches":  # too short to time: the choice never moves, probes come at fixed batches
        assert tuner.choice == 2 and [b for b, k in enumerate(used) if k == 1] == list(range(65, 200, 9))
    else:
        assert set(used) == {torch.get_num_threads()}


def test_engine_counts_its_batches_by_threads(two_threads):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 5, (4,))) for _ in range(3)]
    with logging_chunks() as log:
        importance_sums(model, batches, "fisher")
    assert log.threads == {2: 3}  # tiny batches: nothing timed, no probe
    assert log.lines("cpu")[-1] == "importance batches by torch threads: 3 on 2 threads"
    log.threads[1] += 2
    assert log.lines("cpu")[-1] == "importance batches by torch threads: 3 on 2 threads, 2 on 1 thread"
