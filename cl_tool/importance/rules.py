"""Per-layer rules (BackPACK style): one small object per supported layer type.

Each rule turns what forward/backward hooks saw for one layer — its input ``A`` (one tensor per
call of the layer) and the gradient ``G`` of the *summed* per-sample loss with respect to its
output — into the per-sample statistic summed over the batch, without a loop over samples:

    S(θ) = Σₙ f(∂ℓₙ/∂θ),   f = square ("sq") or abs ("abs"), result in float32 (float64 for a float64 model).

Row ``n`` of ``A`` and ``G`` belongs to sample ``n`` (the engine checks dim 0 equals the batch
size). When a layer is called several times in one forward pass, the calls are concatenated
along the position (token / spatial) axis: the per-sample gradient of a shared weight is the sum
over all positions of all calls, which is exactly what the rules compute.

Rules also give the forward-only ``signal`` statistic (paper §4, Kutalev & Lapina 2021): the
magnitude of a weight times the total absolute input signal that reached it, see each rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl_tool.importance.losses import stat_fn, wide, wide_dtype

FLOAT_BYTES = 4
#: Target size of one chunk of materialised per-sample gradients: small enough to stay in the
#: CPU caches while it is squared and summed (2-3× faster than one batch-sized tensor).
WORKING_SET_BYTES = 16 << 20

#: Subclasses that override ``forward`` but compute exactly the base layer's function.
_EQUIVALENT_SUBCLASSES = {
    "timm.layers.norm.LayerNorm": nn.LayerNorm,  # F.layer_norm, optionally the "fast norm" kernel
}


def chunk_size(per_sample_elems: int, budget_bytes: int, batch: int, working_set: bool = False) -> int:
    """Samples per chunk so that ``chunk · per_sample_elems`` float32 values fit ``budget_bytes``
    (and, with ``working_set``, also :data:`WORKING_SET_BYTES`)."""
    limit = min(budget_bytes, WORKING_SET_BYTES) if working_set else budget_bytes
    return max(1, min(batch, limit // max(1, FLOAT_BYTES * per_sample_elems)))


def _is_plain(module: nn.Module, base: type) -> bool:
    """``module`` is a ``base`` whose forward is ``base.forward`` or a known equivalent."""
    if not isinstance(module, base):
        return False
    cls = type(module)
    if cls.forward is base.forward:
        return True
    return _EQUIVALENT_SUBCLASSES.get(f"{cls.__module__}.{cls.__qualname__}") is base


def _only_weight_bias(module: nn.Module) -> bool:
    return all(name in ("weight", "bias") for name, _ in module.named_parameters(recurse=False))


def _abs_sum_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ|t| over every axis but ``dim`` (float32)."""
    t = wide(t).abs().movedim(dim, 0)
    return t.reshape(t.shape[0], -1).sum(1)


def _cat_positions(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Concatenate several calls of a layer along the position axis (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


#: Up to this many positions per sample, Σₙ(Gₙ Aₙᵀ)² is computed from position pairs by one GEMM.
PAIRWISE_MAX_POSITIONS = 4


def _outer_stat(G: torch.Tensor, A: torch.Tensor, f) -> torch.Tensor:
    """One position: Σₙ f(gₙ aₙᵀ) = f(G)ᵀ f(A) (f multiplicative: x², |x|). (n,g,o),(n,g,i) → (g,o,i)."""
    return torch.einsum("ngo,ngi->goi", f(G), f(A))


def _pairwise_sq_stat(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Σₙ (Σₜ Gₙₜ Aₙₜᵀ)² = Σₙ Σ_{t≤t'} c_tt' (Gₙₜ∘Gₙₜ')(Aₙₜ∘Aₙₜ')ᵀ, c = 1 (t = t') or 2.

    One GEMM with T(T+1)/2 terms per sample instead of materialising per-sample gradients;
    faster for few positions. (n,g,o,T),(n,g,i,T) → (g,o,i).
    """
    T = G.shape[-1]
    G, A = G.movedim(-1, 0).contiguous(), A.movedim(-1, 0).contiguous()  # (T, n, g, ·)
    first, second = torch.triu_indices(T, T, device=G.device)
    weight = torch.where(first == second, 1.0, 2.0).to(G.device).reshape(-1, 1, 1, 1)
    GG = G[first] * G[second] * weight
    AA = A[first] * A[second]
    return torch.einsum("kngo,kngi->goi", GG, AA)


def _materialised_stat(G: torch.Tensor, A: torch.Tensor, stat: str) -> torch.Tensor:
    """Σₙ f(Gₙ Aₙᵀ) by ``bmm`` of per-sample gradients (n·g, o, i), then f and a sum over n."""
    n, g, o, T = G.shape
    per_sample = torch.bmm(G.reshape(n * g, o, T), A.reshape(n * g, A.shape[2], T).transpose(1, 2))
    per_sample = per_sample.square_() if stat == "sq" else per_sample.abs_()
    return per_sample.reshape(n, g, o, -1).sum(0)


def weight_stat(G: torch.Tensor, A: torch.Tensor, stat: str, budget_bytes: int) -> torch.Tensor:
    """Σₙ f(∂ℓₙ/∂W) with ∂ℓₙ/∂W = Gₙ Aₙᵀ per group (the weight gradient of a linear map).

    ``G``: (n, g, o, T) output gradients, ``A``: (n, g, i, T) inputs, T positions per sample
    (views are fine). Picks the cheapest exact formula: T = 1 outer-product identity; f = x² and
    T ≤ :data:`PAIRWISE_MAX_POSITIONS` position pairs; otherwise materialised per-sample
    gradients in cache-sized chunks. Returns float32 (g, o, i).
    """
    n, g, o, T = G.shape
    i = A.shape[2]
    f = stat_fn(stat)
    if T == 1:
        return _outer_stat(G[..., 0], A[..., 0], f)
    if stat == "sq" and T <= PAIRWISE_MAX_POSITIONS:
        step = chunk_size(g * (o + i) * T * (T + 1) // 2, budget_bytes, n)
        parts = (_pairwise_sq_stat(G[s:s + step], A[s:s + step]) for s in range(0, n, step))
    else:
        step = chunk_size(g * o * i, budget_bytes, n, working_set=True)
        parts = (_materialised_stat(G[s:s + step], A[s:s + step], stat) for s in range(0, n, step))
    total = next(parts)
    for part in parts:
        total += part
    return total


class Rule:
    """Base class: which modules a rule accepts and its two statistics."""

    base: type = nn.Module

    def accepts(self, module: nn.Module) -> bool:
        return _is_plain(module, self.base) and _only_weight_bias(module)

    def grad_stat(self, module, calls, stat: str, budget_bytes: int) -> dict[str, torch.Tensor]:
        """``calls``: list of (input, grad_output) pairs → {"weight": Σₙ f(g), "bias": ...}."""
        raise NotImplementedError

    def signal(self, module, inp: torch.Tensor, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Contribution of one call to the signal statistic."""
        raise NotImplementedError


class LinearRule(Rule):
    """``y = W a + b`` on inputs (B, d_in) or (B, …, d_in).

    Per sample: ∂ℓₙ/∂W = Σ_t gₙₜ aₙₜᵀ, ∂ℓₙ/∂b = Σ_t gₙₜ. One position (B, d): the outer-product
    identity Σₙ(gₙaₙᵀ)² = (G∘G)ᵀ(A∘A), Σₙ|gₙaₙᵀ| = |G|ᵀ|A| (no per-sample tensor). Several
    positions: per-sample Gₙᵀ Aₙ by batched matmul in chunks bounded by the memory budget.

    Signal: weight w_ji → |w_ji|·Σₙ Σ_t |aₙₜᵢ| (input units × weight units); bias b_j →
    Σₙ Σ_t |yₙₜⱼ| (the layer's pre-activation output, output units).
    """

    base = nn.Linear

    def grad_stat(self, module, calls, stat, budget_bytes):
        f = stat_fn(stat)
        A = _cat_positions([wide(a).reshape(a.shape[0], -1, module.in_features) for a, _ in calls])
        G = _cat_positions([wide(g).reshape(g.shape[0], -1, module.out_features) for _, g in calls])
        out: dict[str, torch.Tensor] = {}
        if module.weight.requires_grad:
            out["weight"] = weight_stat(G.transpose(1, 2)[:, None], A.transpose(1, 2)[:, None], stat, budget_bytes)[0]
        if module.bias is not None:
            out["bias"] = f(G.sum(1)).sum(0)
        return out

    def signal(self, module, inp, out):
        a = wide(inp).abs().reshape(-1, module.in_features).sum(0)
        res = {"weight": wide(module.weight.detach()).abs() * a[None, :]}
        if module.bias is not None:
            res["bias"] = wide(out).abs().reshape(-1, module.out_features).sum(0)
        return res


class ConvRule(Rule):
    """Conv1d/Conv2d with any stride, padding (incl. "same" and non-zero padding modes), dilation
    and groups, through ``unfold``: with patches Pₙ (C_in·k, L) and output gradient Gₙ (C_out, L),
    per group: ∂ℓₙ/∂W = Gₙ Pₙᵀ, computed for chunks of samples by batched matmul; bias Σ_L Gₙ.

    Signal (generalisation of the paper's linear-layer rule): weight w[o,c,kh,kw] →
    |w[o,c,kh,kw]|·Σₙ Σ_positions |patch value at (c,kh,kw)| — the column sums of |unfold(x)|
    (after padding) for the input channels of o's group, i.e. the total absolute input that was
    multiplied by that weight; bias → Σₙ Σ_positions |yₙ,o| (pre-activation output).
    """

    base = (nn.Conv1d, nn.Conv2d)

    def accepts(self, module):
        return any(_is_plain(module, b) for b in self.base) and _only_weight_bias(module)

    @staticmethod
    def _geometry(module):
        if isinstance(module, nn.Conv1d):
            return (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        return tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)

    def patches(self, module, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in·kh·kw, L) input patches as seen by the convolution (padding applied)."""
        pads = getattr(module, "_reversed_padding_repeated_twice", None)
        if pads is None:
            pads = [p for p in reversed(module.padding) for _ in range(2)]
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, list(pads), mode=mode)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
        kernel, stride, dilation = self._geometry(module)
        return F.unfold(x, kernel, dilation=dilation, stride=stride)

    def grad_stat(self, module, calls, stat, budget_bytes):
        f = stat_fn(stat)
        c_out, g = module.out_channels, module.groups
        ik = module.in_channels // g * math.prod(module.kernel_size)
        batch = calls[0][0].shape[0]
        positions = sum(math.prod(gr.shape[2:]) for _, gr in calls)
        step = chunk_size(positions * (module.in_channels * math.prod(module.kernel_size) + c_out), budget_bytes, batch)
        dtype = wide_dtype(calls[0][1].dtype)
        weight = torch.zeros(g, c_out // g, ik, device=calls[0][1].device, dtype=dtype)
        bias = torch.zeros(c_out, device=weight.device, dtype=dtype)
        for s in range(0, batch, step):
            P = _cat_positions([self.patches(module, wide(a[s:s + step])) for a, _ in calls], 2)
            G = _cat_positions([wide(gr[s:s + step]).reshape(gr[s:s + step].shape[0], c_out, -1) for _, gr in calls], 2)
            n, L = P.shape[0], P.shape[-1]
            if module.weight.requires_grad:
                weight += weight_stat(G.reshape(n, g, c_out // g, L), P.reshape(n, g, ik, L), stat, budget_bytes)
            bias += f(G.sum(-1)).sum(0)
        out = {}
        if module.weight.requires_grad:
            out["weight"] = weight.reshape(module.weight.shape)
        if module.bias is not None:
            out["bias"] = bias
        return out

    def signal(self, module, inp, out):
        g = module.groups
        col = self.patches(module, wide(inp)).abs().sum(dim=(0, 2))  # (C_in·k,)
        col = col.reshape(g, 1, -1).expand(g, module.out_channels // g, col.numel() // g)
        res = {"weight": wide(module.weight.detach()).abs() * col.reshape(module.weight.shape)}
        if module.bias is not None:
            res["bias"] = _abs_sum_except(out, 1)
        return res


class _NormRule(Rule):
    """Affine normalisation ``y = γ·x̂ + β`` where x̂ is recomputed from the saved input.

    Per sample: ∂ℓₙ/∂γ = Σ_positions Gₙ·x̂ₙ, ∂ℓₙ/∂β = Σ_positions Gₙ (materialised: only
    B × #features values). Signal (the linear rule applied to the diagonal map x̂ ↦ γ·x̂):
    γ → |γ|·Σₙ Σ_positions |x̂| (x̂ is unitless), β → Σₙ Σ_positions |y| (output units).
    """

    def normalized(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, module, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (B, …) over positions → (B, *param_shape)."""
        param = module.weight if module.weight is not None else module.bias
        return t.reshape(t.shape[0], param.shape[0], -1).sum(-1)

    def grad_stat(self, module, calls, stat, budget_bytes):
        f = stat_fn(stat)
        gw = gb = 0
        for a, gr in calls:
            gr = wide(gr)
            if module.weight is not None and module.weight.requires_grad:
                gw = gw + self.per_sample(module, gr * self.normalized(module, wide(a)))
            if module.bias is not None:
                gb = gb + self.per_sample(module, gr)
        out = {}
        if module.weight is not None and module.weight.requires_grad:
            out["weight"] = f(gw).sum(0)
        if module.bias is not None:
            out["bias"] = f(gb).sum(0)
        return out

    def signal(self, module, inp, out):
        res = {}
        if module.weight is not None:
            xhat = self.normalized(module, wide(inp)).abs()
            res["weight"] = wide(module.weight.detach()).abs() * self.per_sample(module, xhat).sum(0)
        if module.bias is not None:
            res["bias"] = self.per_sample(module, wide(out).abs()).sum(0)
        return res


class LayerNormRule(_NormRule):
    """LayerNorm over the trailing ``normalized_shape`` axes: x̂ = (x − mean)/√(var + ε)."""

    base = nn.LayerNorm

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def per_sample(self, module, t):
        shape = tuple(module.normalized_shape)
        return t.reshape(t.shape[0], -1, *shape).sum(1)


class BatchNormRule(_NormRule):
    """BatchNorm1d/2d/3d in eval mode with running statistics (channel axis 1):
    x̂ = (x − running_mean)/√(running_var + ε). Without running statistics BatchNorm mixes the
    samples of a batch; the engine then uses its per-sample fallback for the whole model."""

    base = nn.modules.batchnorm._BatchNorm

    def accepts(self, module):
        return (super().accepts(module) and module.affine and not module.training
                and module.running_mean is not None and module.running_var is not None)

    def normalized(self, module, x):
        return F.batch_norm(x, wide(module.running_mean), wide(module.running_var), None, None, False, 0.0, module.eps)


class GroupNormRule(_NormRule):
    """GroupNorm: x̂ normalised per sample over each group of channels and all positions."""

    base = nn.GroupNorm

    def accepts(self, module):
        return super().accepts(module) and module.affine

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class EmbeddingRule(Rule):
    """Embedding lookup (no ``max_norm``, no ``scale_grad_by_freq``): the per-sample gradient of
    row v is the sum of Gₙₜ over the positions t where sample n looked v up (rows at
    ``padding_idx`` get no gradient). Computed by grouping (sample, row) pairs with ``unique``.

    Signal: the linear rule with a one-hot input: row v → |w_v|·(number of look-ups of v).
    """

    base = nn.Embedding

    def accepts(self, module):
        return super().accepts(module) and module.max_norm is None and not module.scale_grad_by_freq

    def grad_stat(self, module, calls, stat, budget_bytes):
        f = stat_fn(stat)
        vocab, dim = module.weight.shape
        keys, rows = [], []
        for idx, gr in calls:
            batch = idx.shape[0]
            sample = torch.arange(batch, device=idx.device).reshape(batch, *([1] * (idx.dim() - 1)))
            keys.append((sample * vocab + idx).reshape(-1))
            rows.append(wide(gr).reshape(-1, dim))
        keys, rows = torch.cat(keys), torch.cat(rows)
        if module.padding_idx is not None:
            keep = keys % vocab != module.padding_idx
            keys, rows = keys[keep], rows[keep]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        per_sample_rows = rows.new_zeros(uniq.numel(), dim).index_add_(0, inverse, rows)
        weight = rows.new_zeros(vocab, dim).index_add_(0, uniq % vocab, f(per_sample_rows))
        return {"weight": weight}

    def signal(self, module, inp, out):
        counts = torch.bincount(inp.reshape(-1), minlength=module.num_embeddings).to(wide_dtype(module.weight.dtype))
        return {"weight": wide(module.weight.detach()).abs() * counts[:, None]}


RULES: tuple[Rule, ...] = (LinearRule(), ConvRule(), LayerNormRule(), BatchNormRule(), GroupNormRule(), EmbeddingRule())


def rule_for(module: nn.Module) -> Rule | None:
    """The rule that handles ``module`` exactly, or None (its parameters go to the fallback)."""
    if not any(True for _ in module.parameters(recurse=False)):
        return None
    for rule in RULES:
        if rule.accepts(module):
            return rule
    return None
