"""Slow reference implementations, for tests and the benchmark (not used by the CLI).

* :func:`naive_sums` — the definition: each sample on its own (batch of one), autograd, and
  Σₙ Σₖ f(∂ℓₙ⁽ᵏ⁾/∂θ); the signal statistic summed from per-sample forward passes.
* :func:`batch_mean_sums` — the common approximation (e.g. Avalanche's EWC): per mini-batch of
  size B the gradient ḡ of the *mean* loss, accumulated as B·f(ḡ). Not a per-sample statistic.

Both use the same labels as the engine for a given ``generator`` (sampled labels are drawn per
batch from the per-sample logits with :func:`make_targets`).
"""

from __future__ import annotations

import torch
from torch import nn

from cl_tool.importance.api import _eval_on
from cl_tool.importance.engine import SignalEngine
from cl_tool.importance.losses import LossSpec, make_targets, per_sample_losses, stat_fn, wide, wide_dtype


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def naive_sums(
    model: nn.Module,
    batches,
    method: str,
    *,
    fisher_labels: str = "empirical",
    mas_output: str = "logits",
    generator: torch.Generator | None = None,
    device="cpu",
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-sample loop: same contract as ``importance_sums`` (fp32 only; float64 sums for a float64 model)."""
    device = torch.device(device)
    params = _trainable(model)
    with _eval_on(model, device):
        if method == "signal":
            engine = SignalEngine(model)
            for x, _ in batches:
                for i in range(x.shape[0]):
                    engine.add_batch(x[i : i + 1].to(device))
            return {n: t.cpu() for n, t in engine.result().items()}, engine.count
        spec = LossSpec(method, fisher_labels, mas_output)
        f = stat_fn(spec.stat)
        sums = {n: torch.zeros(p.shape, device=device, dtype=wide_dtype(p.dtype)) for n, p in params.items()}
        count = 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            targets = None
            if spec.loss == "nll" and spec.fisher_labels == "sampled":
                # One draw per batch from all its logits, like the engine (same generator sequence).
                with torch.no_grad():
                    logits = torch.cat([wide(model(x[i : i + 1])) for i in range(x.shape[0])])
                targets = make_targets(logits, y, spec, generator)
            for i in range(x.shape[0]):
                logits_i = wide(model(x[i : i + 1]))
                target_i = (
                    targets[i : i + 1]
                    if targets is not None
                    else make_targets(logits_i.detach(), y[i : i + 1], spec, generator)
                )
                losses = per_sample_losses(logits_i, target_i, spec)[0]
                for k in range(losses.shape[0]):
                    grads = torch.autograd.grad(
                        losses[k], list(params.values()), retain_graph=k + 1 < losses.shape[0], allow_unused=True
                    )
                    for n, g in zip(params, grads):
                        if g is not None:
                            sums[n] += f(wide(g))
            count += x.shape[0]
    return {n: t.cpu() for n, t in sums.items()}, count


def batch_mean_sums(
    model: nn.Module,
    batches,
    method: str = "fisher",
    *,
    fisher_labels: str = "empirical",
    mas_output: str = "logits",
    generator: torch.Generator | None = None,
    device="cpu",
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over batches of B·f(∇ mean-loss): the mini-batch approximation of the same sums."""
    device = torch.device(device)
    params = _trainable(model)
    spec = LossSpec(method, fisher_labels, mas_output)
    f = stat_fn(spec.stat)
    sums = {n: torch.zeros(p.shape, device=device, dtype=wide_dtype(p.dtype)) for n, p in params.items()}
    count = 0
    with _eval_on(model, device):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = wide(model(x))
            targets = make_targets(logits.detach(), y, spec, generator)
            loss = per_sample_losses(logits, targets, spec).sum(1).mean()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += x.shape[0] * f(wide(g))
            count += x.shape[0]
    return {n: t.cpu() for n, t in sums.items()}, count
