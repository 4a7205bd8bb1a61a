"""Accuracy and loss of a model on a task (evaluate, prune sweeps, train-next --eval-data and its final figure)."""

from __future__ import annotations

from cl_tool.runtime import autocast


def evaluate_task(model, task, *, device, batch_size: int = 512, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of ``model`` on every sample of ``task`` (a ``cl_tool.data.Task``), batched,
    under inference_mode, never augmented; the model's mode is restored."""
    acc, loss, _ = _evaluate(model, task.batches(batch_size=batch_size, device=device), device, precision)
    return acc, loss


def spread_rows(n: int, m: int) -> list[int]:
    """``min(m, n)`` rows of 0..n-1 evenly spaced: row ⌊i·n/m⌋ for i = 0..m-1 (every row when m ≥ n), so a task
    sorted by class (an imagefolder) is represented by all its classes."""
    m = min(m, n)
    return [i * n // m for i in range(m)]


def evaluate_slice(
    model, task, *, limit: int, device, batch_size: int = 512, precision: str = "fp32"
) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, samples) of ``model`` on at most ``limit`` samples of ``task``, as
    :func:`evaluate_task`: the rows :func:`spread_rows` picks, or a stream's first ``limit`` samples."""
    if task.num_samples is None:
        batches = task.batches(batch_size=batch_size, device=device)
        try:
            return _evaluate(model, batches, device, precision, limit=limit)
        finally:
            batches.close()
    rows = spread_rows(task.num_samples, limit)
    order = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return _evaluate(model, task.batches(order, device=device), device, precision)


def _evaluate(model, batches, device, precision: str, limit: int | None = None) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, samples) over ``batches`` (of ``Batch``), the first ``limit`` samples if given."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.inference_mode(), autocast(device, precision):
        for batch in batches:
            x, y = batch.x, batch.y
            if limit is not None:
                x, y = x[: limit - n], y[: limit - n]
            out = model(x).float()
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += int(y.shape[0])
            if limit is not None and n >= limit:
                break
    model.train(was_training)
    return correct / max(1, n), loss_sum / max(1, n), n
