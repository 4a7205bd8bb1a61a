"""Accuracy and loss of a model on a task (evaluate, prune sweeps, train-next --eval-data and its final figure).

Under torch.distributed (``shard=(rank, world)``) each rank evaluates a share of the rows and the
sums (correct predictions, cross-entropy, samples) are added over the ranks, so N ranks do 1/N of
the work each and every rank gets the figures one process computes: accuracy exactly, the loss up to
the order of the float sums. A task of N rows gives rank r the contiguous rows
:func:`cl_tool.data.samplers.share_bounds` (N, r, world); a stream gives rank r its share of each
batch of ``batch_size · world`` samples.
"""

from __future__ import annotations

from cl_tool.runtime import autocast


def evaluate_task(
    model, task, *, device, batch_size: int = 512, precision: str = "fp32", shard: tuple[int, int] | None = None
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of ``model`` on every sample of ``task`` (a ``cl_tool.data.Task``), batched,
    under inference_mode, never augmented; the model's mode is restored. ``shard=(rank, world)``: this rank's share,
    summed over the ranks (module docstring); every rank must call it."""
    rank, world = shard or (0, 1)
    if world == 1:
        return _reduce(_evaluate(model, task.batches(batch_size=batch_size, device=device), device, precision))[:2]
    if task.num_samples is None:
        batches = task.batches(batch_size=batch_size * world, device=device, shard=(rank, world))
    else:
        from cl_tool.data.samplers import share_bounds

        lo, hi = share_bounds(task.num_samples, rank, world)
        batches = task.batches(
            [list(range(i, min(hi, i + batch_size))) for i in range(lo, hi, batch_size)], device=device
        )
    return _reduce(_evaluate(model, batches, device, precision), device)[:2]


def spread_rows(n: int, m: int) -> list[int]:
    """``min(m, n)`` rows of 0..n-1 evenly spaced: row ⌊i·n/m⌋ for i = 0..m-1 (every row when m ≥ n), so a task
    sorted by class (an imagefolder) is represented by all its classes."""
    m = min(m, n)
    return [i * n // m for i in range(m)]


def evaluate_slice(
    model,
    task,
    *,
    limit: int,
    device,
    batch_size: int = 512,
    precision: str = "fp32",
    shard: tuple[int, int] | None = None,
) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, samples) of ``model`` on at most ``limit`` samples of ``task``, as
    :func:`evaluate_task`: the rows :func:`spread_rows` picks (``shard``: this rank's contiguous share of them,
    summed over the ranks), or a stream's first ``limit`` samples (every rank reads them all)."""
    if task.num_samples is None:
        batches = task.batches(batch_size=batch_size, device=device)
        try:
            return _reduce(_evaluate(model, batches, device, precision, limit=limit))
        finally:
            batches.close()
    rows = spread_rows(task.num_samples, limit)
    rank, world = shard or (0, 1)
    if world > 1:
        from cl_tool.data.samplers import share_bounds

        lo, hi = share_bounds(len(rows), rank, world)
        rows = rows[lo:hi]
    order = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return _reduce(
        _evaluate(model, task.batches(order, device=device), device, precision), device if world > 1 else None
    )


def _reduce(sums: tuple[int, float, int], device=None) -> tuple[float, float, int]:
    """(accuracy, mean loss, samples) from (correct, loss sum, samples); with ``device``, the sums over all ranks."""
    correct, loss_sum, n = sums
    if device is not None:
        from cl_tool.distributed import all_reduce_sum

        c, loss_sum, m = all_reduce_sum([float(correct), loss_sum, float(n)], device)  # float64: counts stay exact
        correct, n = int(c), int(m)
    return correct / max(1, n), loss_sum / max(1, n), n


def _evaluate(model, batches, device, precision: str, limit: int | None = None) -> tuple[int, float, int]:
    """(correct predictions, Σ cross-entropy in nats, samples) over ``batches`` (of ``Batch``), the first ``limit``
    samples if given; an empty batch (a rank's empty share) is passed over. One device read at the end."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    with torch.inference_mode(), autocast(device, precision):
        for batch in batches:
            x, y = batch.x, batch.y
            del batch  # x and y go at the end of the step: one batch in memory while the next is made, not two
            if limit is not None:
                x, y = x[: limit - n], y[: limit - n]
            if not y.shape[0]:
                continue
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += int(y.shape[0])
            del x, y, out
            if limit is not None and n >= limit:
                break
    model.train(was_training)
    return int(correct), float(loss_sum), n
