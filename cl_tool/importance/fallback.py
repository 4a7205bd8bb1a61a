"""Exact per-sample gradients for parameters no layer rule covers.

First choice: ``torch.func.vmap(jacrev(loss))`` over ``functional_call`` of the whole model on a
batch of one sample, differentiated w.r.t. just those parameters (cls tokens, position
embeddings of unusual models, custom modules, tied weights), in chunks of samples. If the model
cannot be vmapped (an op without a batching rule, data-dependent control flow), a plain loop
over samples with ``torch.autograd.grad`` is used for the rest of the call. Both return
Σₙ Σₖ f(∂ℓₙ⁽ᵏ⁾/∂θ) exactly as the layer rules do.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from cl_tool.importance.losses import LossSpec, per_sample_losses, stat_fn, wide, wide_dtype
from cl_tool.importance.rules import chunk_size, set_chunk_layer


@contextmanager
def unfused_attention(model: nn.Module):
    """Switch timm-style ``fused_attn`` flags off (SDPA has no CPU batching rule for vmap)."""
    changed = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


class PerSampleFallback:
    """Per-sample statistic for named parameters of ``model`` (vmap, else a loop)."""

    def __init__(self, model: nn.Module, spec: LossSpec, autocast=nullcontext, budget_bytes: int = 512 << 20):
        self.model = model
        self.spec = spec
        self.autocast = autocast
        self.budget_bytes = budget_bytes
        self.params = dict(model.named_parameters())
        self.use_vmap = True
        self.vmap_error: Exception | None = None

    def stats(self, names: list[str], x: torch.Tensor, targets: torch.Tensor, passes: int) -> dict[str, torch.Tensor]:
        """{name: Σₙ Σₖ f(∂ℓₙ⁽ᵏ⁾/∂θ)} (float32) for the parameters ``names`` over batch ``x``."""
        if not names:
            return {}
        if self.use_vmap:
            try:
                return self._vmap(names, x, targets, passes)
            except Exception as exc:  # noqa: BLE001 - any vmap failure: fall back to the exact loop
                self.use_vmap, self.vmap_error = False, exc
        return self._loop(names, x, targets)

    def _loss_one(self, sub: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            z = functional_call(self.model, sub, (xi.unsqueeze(0),), strict=False)
        return per_sample_losses(wide(z), ti.reshape(1), self.spec)[0]

    def _vmap(self, names, x, targets, passes):
        f = stat_fn(self.spec.stat)
        sub = {n: self.params[n].detach() for n in names}
        numel = sum(t.numel() for t in sub.values())
        set_chunk_layer(f"per-sample fallback ({', '.join(names)})")
        step = chunk_size(2 * passes * numel, self.budget_bytes, x.shape[0], device=x.device)
        per_sample_jac = vmap(jacrev(self._loss_one), in_dims=(None, 0, 0))
        acc = {n: torch.zeros(t.shape, device=t.device, dtype=wide_dtype(t.dtype)) for n, t in sub.items()}
        with torch.no_grad(), unfused_attention(self.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for s in range(0, x.shape[0], step):
                jac = per_sample_jac(sub, x[s : s + step], targets[s : s + step])
                for n in names:
                    acc[n] += f(wide(jac[n])).sum(dim=(0, 1))
        return acc

    def _loop(self, names, x, targets):
        f = stat_fn(self.spec.stat)
        params = [self.params[n] for n in names]
        acc = [torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype)) for p in params]
        for i in range(x.shape[0]):
            with torch.enable_grad(), self.autocast():
                z = self.model(x[i : i + 1])
            losses = per_sample_losses(wide(z), targets[i : i + 1], self.spec)[0]
            for k in range(losses.shape[0]):
                grads = torch.autograd.grad(losses[k], params, retain_graph=k + 1 < losses.shape[0], allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += f(wide(g))
        return dict(zip(names, acc))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 (float64) logits of each sample on its own (batch of one), (B, K)."""
        outs = []
        for i in range(x.shape[0]):
            with self.autocast():
                outs.append(wide(self.model(x[i : i + 1])))
        return torch.cat(outs)
