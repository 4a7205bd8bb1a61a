"""Accuracy and loss of a model on a task (evaluate, prune sweeps, train-next --eval-data)."""

from __future__ import annotations

from cl_tool.runtime import autocast


def evaluate_task(model, task, *, device, batch_size: int = 512, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of ``model`` on every sample of ``task`` (a ``cl_tool.data.Task``), batched,
    under inference_mode, never augmented; the model's mode is restored."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.inference_mode(), autocast(device, precision):
        for batch in task.batches(batch_size=batch_size, device=device):
            out = model(batch.x).float()
            loss_sum += float(F.cross_entropy(out, batch.y, reduction="sum"))
            correct += int((out.argmax(1) == batch.y).sum())
            n += int(batch.y.shape[0])
    model.train(was_training)
    return correct / max(1, n), loss_sum / max(1, n)
