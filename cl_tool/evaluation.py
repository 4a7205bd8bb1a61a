"""Accuracy and mean cross-entropy of a model on a task (evaluate, prune sweeps, train-next --eval-data)."""

from __future__ import annotations

from cl_tool.runtime import autocast


def evaluate_task(model, x, y, *, device, batch_size: int = 512, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of ``model`` on (x, y), batched, under inference_mode; the model's mode is restored."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, int(y.shape[0])
    with torch.inference_mode(), autocast(device, precision):
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            yb = y[i:i + batch_size].to(device, non_blocking=True)
            out = model(xb).float()
            loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(1, n), loss_sum / max(1, n)
