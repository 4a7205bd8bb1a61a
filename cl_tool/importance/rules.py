"""Per-layer rules (BackPACK style): one small object per supported layer type.

Each rule turns what forward/backward hooks saw for one layer — its input ``A`` (one tensor per
call of the layer) and the gradient ``G`` of the *summed* per-sample loss with respect to its
output — into the per-sample statistic summed over the batch, without a loop over samples:

    S(θ) = Σₙ Σₚ f(∂ℓₙ⁽ᵖ⁾/∂θ),   f = square ("sq") or abs ("abs"), result in float32 (float64 for a float64 model).

The engine calls ``grad_stat`` once per loss pass p (P = 1, or the K classes of exact-label
Fisher, see ``losses``) and ``finish`` once after the last pass of a batch: a rule may sum a
pass-independent factor in ``state`` (a dict per layer and batch) and turn it into the
statistic once (the one-position outer-product identity needs one GEMM per batch, not per
pass). Row ``n`` of ``A`` and ``G`` belongs to sample ``n`` (the engine checks dim 0 equals
the batch size). When a layer is called several times in one forward pass, the calls are concatenated
along the position (token / spatial) axis: the per-sample gradient of a shared weight is the sum
over all positions of all calls, which is exactly what the rules compute.

Rules also give the forward-only ``signal`` statistic (paper §4, Kutalev & Lapina 2021): the
magnitude of a weight times the input signal that reached it, see each rule. With a_{n,p} the input
that multiplies weight w in sample n at position p (a token, a spatial position of a conv's output;
P_n positions per sample and call) and :class:`SignalVariant` (norm, stat), a call adds

    l1, sum  (the paper):  |w| · Σₙ Σₚ |a_{n,p}|
    l1, mean:              |w| · Σₙ (1/Pₙ) Σₚ |a_{n,p}|
    l2, sum  (Wanda):      |w| · √(Σₙ Σₚ a²_{n,p})              = |w|·‖X_w‖₂ over all samples and positions
    l2, mean:              |w| · √(Σₙ (1/Pₙ) Σₚ a²_{n,p})       = |w|·√N·RMS of a (equal Pₙ)

A rule returns the additive part of one call (l1: the term itself; l2: w²·Σₙ (1/Pₙ)^[mean] Σₚ a²);
the square root of the l2 total is taken once, over all calls, batches and processes
(:meth:`SignalVariant.finish`). A bias is scored by the same formula on its unit's output y (w = 1).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cl_tool.importance.losses import stat_fn, wide, wide_dtype

FLOAT_BYTES = 4
#: Target size on the CPU of one chunk of materialised per-sample gradients (and the inputs that make
#: them): small enough to stay in the CPU's L2/L3 cache between the GEMM that writes it and the pass
#: that squares and sums it. A buffer of this size is reused for every chunk of a layer. On a GPU the
#: memory budget alone bounds a chunk (see :func:`chunk_size`).
WORKING_SET_BYTES = 4 << 20
#: Per-sample gradient matrices at least this large are squared and summed one at a time with
#: ``addcmul_`` (one read of the matrix, the running sum stays in cache); smaller ones in one
#: ``square_`` + ``sum`` per chunk (fewer calls).
ROW_LOOP_BYTES = 64 << 10

#: Subclasses that override ``forward`` but compute exactly the base layer's function.
_EQUIVALENT_SUBCLASSES = {
    "timm.layers.norm.LayerNorm": nn.LayerNorm,  # F.layer_norm, optionally the "fast norm" kernel
}


class ChunkLog:
    """What the engine chose while this log was active (for ``--debug``): the chunk sizes of
    :func:`chunk_size`, by layer, and how many batches ran on each torch thread count (``threads``)."""

    def __init__(self):
        self.layer = "?"
        self.rows: dict[str, tuple[int, int, int, str]] = {}  # layer -> (chunk, batch, floats per sample, limit)
        self.threads: Counter = Counter()  # torch threads -> batches

    def lines(self, device) -> list[str]:
        lines = [
            f"importance chunks on {device}: {layer}: {chunk} of {batch} samples per chunk "
            f"({elems:,} floats per sample; limit: {limit})"
            for layer, (chunk, batch, elems, limit) in self.rows.items()
        ]
        if self.threads:
            parts = ", ".join(f"{n} on {k} thread{'s' if k > 1 else ''}" for k, n in sorted(self.threads.items())[::-1])
            lines.append(f"importance batches by torch threads: {parts}")
        return lines


_LOGS: list[ChunkLog] = []


@contextlib.contextmanager
def logging_chunks():
    """``with logging_chunks() as log:`` records every chunk size chosen inside (``log.layer`` names the layer)."""
    log = ChunkLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def count_batch_threads(threads: int) -> None:
    """One more batch ran on ``threads`` torch threads (for an active :class:`ChunkLog`)."""
    for log in _LOGS:
        log.threads[threads] += 1


def set_chunk_layer(name: str) -> None:
    """The layer whose chunks are sized next (for an active :class:`ChunkLog`)."""
    if _LOGS:
        _LOGS[-1].layer = name


def chunk_size(
    per_sample_elems: int,
    budget_bytes: int,
    batch: int,
    working_set: bool = False,
    device=None,
    by_threads: bool = False,
) -> int:
    """Samples per chunk so that ``chunk · per_sample_elems`` float32 values fit ``budget_bytes``.

    With ``working_set`` on the CPU (``device`` None or a CPU), also :data:`WORKING_SET_BYTES`, so a
    chunk stays in cache between the GEMM that writes it and the pass that reads it; ``by_threads``
    then rounds it down to a multiple of torch's threads (a batched GEMM splits the chunk evenly
    over them), at least min(threads, what the budget allows). On a GPU the budget alone: its
    caches are too small to size for, and every chunk costs kernel launches, so the fewest chunks
    that fit the budget are fastest.
    """
    cpu = device is None or torch.device(device).type == "cpu"
    cache = working_set and cpu and budget_bytes > WORKING_SET_BYTES
    fit = max(1, min(batch, budget_bytes // max(1, FLOAT_BYTES * per_sample_elems)))
    step = max(1, min(batch, WORKING_SET_BYTES // max(1, FLOAT_BYTES * per_sample_elems))) if cache else fit
    if by_threads and working_set and cpu:
        threads = torch.get_num_threads()
        step = max(step - step % threads, min(threads, fit))
    limit = WORKING_SET_BYTES if cache else budget_bytes
    if _LOGS:
        what = (
            f"CPU cache working set {WORKING_SET_BYTES >> 20} MiB" if cache else f"memory budget {limit / 2**20:g} MiB"
        )
        _LOGS[-1].rows[_LOGS[-1].layer] = (step, batch, per_sample_elems, what)
    return step


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


#: Up to this many positions per sample, Σₙ(Gₙ Aₙ)² is computed from position pairs by one GEMM.
PAIRWISE_MAX_POSITIONS = 4


def position_pairs(T: int) -> list[tuple[int, int]]:
    """The pairs t ≤ t' of T positions, in the order of :func:`_pair_products`."""
    return [(t, u) for t in range(T) for u in range(t, T)]


def _pair_products(X: torch.Tensor, weighted: bool, pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Products of position pairs t ≤ t' of ``X`` (n, g, T, c) → (g, n, len(pairs), c), times
    c_tt' = 1 (t = t') or 2 with ``weighted``; ``pairs``: a subset (default all, :func:`position_pairs`).

    One ``mul`` per pair into a preallocated result (no gathered copies of ``X``), laid out so
    that :func:`finish_weight_stat` contracts over (sample, pair) with one GEMM per group."""
    n, g, T, c = X.shape
    pairs = position_pairs(T) if pairs is None else pairs
    out = X.new_empty(g, n, len(pairs), c)
    Xg = X.transpose(0, 1)  # (g, n, T, c)
    for k, (t, u) in enumerate(pairs):
        dst = out[:, :, k]
        torch.mul(Xg[:, :, t], Xg[:, :, u], out=dst)
        if weighted and t != u:
            dst.mul_(2)
    return out


def _add_stat_rows(total: torch.Tensor, prod: torch.Tensor, stat: str) -> None:
    """``total`` (X,) += Σ_r f(prod[r]) for ``prod`` (R, X); ``prod`` is overwritten."""
    if stat == "sq" and prod.shape[1] * prod.element_size() >= ROW_LOOP_BYTES:
        for row in prod:
            total.addcmul_(row, row)
    else:
        total += (prod.square_() if stat == "sq" else prod.abs_()).sum(0)


def _materialised_stat(G: torch.Tensor, inputs, i: int, stat: str, budget_bytes: int) -> torch.Tensor:
    """Σₙ f(Gₙ Aₙ) from per-sample gradients made by ``bmm`` in cache-sized chunks.

    The inputs of a chunk are made once (``inputs(s, e)``), the products go to a reused buffer
    and are squared (or made absolute) and summed while they are still in cache.
    """
    n, g, o, T = G.shape
    per_sample = g * (o * i + T * i)
    step = chunk_size(per_sample, budget_bytes, n, working_set=True, device=G.device, by_threads=True)
    total = torch.zeros(g, o * i, device=G.device, dtype=G.dtype)
    buf = torch.empty(step * g, o, i, device=G.device, dtype=G.dtype)
    G = G.reshape(n * g, o, T)
    for s in range(0, n, step):
        e = min(n, s + step)
        out = buf[: (e - s) * g]
        torch.bmm(G[s * g : e * g], inputs(s, e).reshape(-1, T, i), out=out)
        if g == 1:
            _add_stat_rows(total[0], out.view(e - s, o * i), stat)
        else:
            prod = out.view(e - s, g, o * i)
            total += (prod.square_() if stat == "sq" else prod.abs_()).sum(0)
    return total.view(g, o, i)


def weight_stat(G: torch.Tensor, inputs, i: int, stat: str, budget_bytes: int, state: dict, key: str = "weight"):
    """One pass of Σₙ Σₚ f(∂ℓₙ⁽ᵖ⁾/∂W), ∂ℓₙ⁽ᵖ⁾/∂W = Gₙ Aₙ per group (a linear map's weight gradient).

    ``G``: (n, g, o, T) output gradients of this pass (views are fine); ``inputs(s, e)``: the
    inputs (e − s, g, T, i) of samples s..e−1, T positions per sample. Picks the cheapest exact
    formula. T = 1: the outer-product identity Σₙ f(gₙaₙᵀ) = Σₙ f(gₙ) f(aₙ)ᵀ (f = x², |x|);
    f = x² and T ≤ :data:`PAIRWISE_MAX_POSITIONS`: Σₙ (Σₜ gₙₜaₙₜᵀ)² = Σₙ Σ_{t≤t'} c_tt'
    (gₙₜ∘gₙₜ')(aₙₜ∘aₙₜ')ᵀ. Both are linear in a G-only factor, so over several passes the factor
    is summed in ``state[key]`` and one GEMM per batch finishes it (:func:`finish_weight_stat`);
    this pass then returns None. Otherwise the per-sample gradients are materialised in
    cache-sized chunks and the pass's (g, o, i) sum is returned (in G's accumulation dtype).
    """
    T = G.shape[-1]
    if T == 1:
        factor = stat_fn(stat)(G[..., 0])  # (n, g, o)
    elif stat == "sq" and T <= PAIRWISE_MAX_POSITIONS:
        factor = _pair_products(G.transpose(2, 3), weighted=True)  # (g, n, K, o)
    else:
        return _materialised_stat(G, inputs, i, stat, budget_bytes)
    if key in state:
        state[key] += factor
    else:
        state[key] = factor
    return None


def finish_weight_stat(
    factor: torch.Tensor, inputs, i: int, stat: str, budget_bytes: int, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """(g, o, i) from a factor summed by :func:`weight_stat` over a batch's passes.

    Position pairs: Σ over (sample, pair) of the factor times the input pair products, one GEMM
    per group. ``seen`` (T, B) bool, for inputs whose i columns form B equal blocks (a conv's kernel
    offsets, C/groups channels each): whether a block's inputs at position t can be non-zero (False
    where they are zero padding whatever the data). A pair with an unseen position adds nothing to
    that block, so each block contracts over its seen pairs only (at 2×2 positions, 3×3 kernel and
    padding 1: 26 pairs for the 9 offsets, not 90). At one position the unseen blocks are zero and
    the GEMM runs over the seen runs of blocks only (3×3 kernel, padding 1, 1×1 output: 1 of 9)."""
    if factor.dim() == 3:  # one position: Σₙ (Σₚ f(gₚₙ)) f(aₙ)ᵀ, a (g, o, n)·(g, n, i) GEMM
        left, right = factor.permute(1, 2, 0), stat_fn(stat)(inputs(0, factor.shape[0])[:, :, 0]).transpose(0, 1)
        if seen is None:
            return torch.bmm(left, right)
        total = factor.new_zeros(left.shape[0], left.shape[1], i)
        for lo, hi in seen_column_runs(seen[0], i // seen.shape[1]):
            total[:, :, lo:hi] = torch.bmm(left, right[:, :, lo:hi])
        return total
    g, n, k, o = factor.shape
    pairs = position_pairs(round(((8 * k + 1) ** 0.5 - 1) / 2))  # k = T(T+1)/2 pairs of T positions
    if seen is None:
        blocks = [(0, i, list(range(k)))]
    else:
        width = i // seen.shape[1]
        blocks = [
            (b * width, (b + 1) * width, [p for p, (t, u) in enumerate(pairs) if seen[t, b] and seen[u, b]])
            for b in range(seen.shape[1])
        ]
    total = factor.new_zeros(g, o, i)
    step = chunk_size(k * g * i, budget_bytes, n, device=factor.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        X = inputs(s, e)
        for lo, hi, chosen in blocks:
            if not chosen:
                continue
            f = factor[:, s:e] if len(chosen) == k else factor[:, s:e, chosen]
            prod = _pair_products(X[..., lo:hi], weighted=False, pairs=[pairs[p] for p in chosen])
            m = (e - s) * len(chosen)
            total[:, :, lo:hi].baddbmm_(f.reshape(g, m, o).transpose(1, 2), prod.view(g, m, hi - lo))
    return total


def seen_column_runs(seen: torch.Tensor, width: int) -> list[tuple[int, int]]:
    """Column ranges [lo, hi) of the maximal runs of True in ``seen`` (B,) bool, block b being the
    ``width`` columns from b·width."""
    runs: list[tuple[int, int]] = []
    for b, s in enumerate(seen.tolist()):
        if not s:
            continue
        if runs and runs[-1][1] == b * width:
            runs[-1] = (runs[-1][0], (b + 1) * width)
        else:
            runs.append((b * width, (b + 1) * width))
    return runs


@dataclass(frozen=True)
class SignalVariant:
    """How the signal statistic summarises the input a weight saw: over a sample's positions ``norm``
    (``sum`` or ``mean``), of each value ``stat`` (``l1``: |a|, ``l2``: a², rooted at the end)."""

    norm: str = "sum"
    stat: str = "l1"

    def power(self, t: torch.Tensor) -> torch.Tensor:
        """|t| (l1) or t² (l2), in the accumulation dtype."""
        t = wide(t)
        return t.abs() if self.stat == "l1" else t.square()

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight factor of the additive part: |w| (l1) or w² (l2)."""
        return self.power(w.detach())

    def per_sample(self, total: torch.Tensor, positions: int) -> torch.Tensor:
        """A total over samples and ``positions`` positions per sample: as is (sum) or divided by them (mean)."""
        return total / positions if self.norm == "mean" and positions > 1 else total

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        """The statistic from the additive total: as is (l1) or its square root (l2)."""
        return s if self.stat == "l1" else s.sqrt()


PAPER = SignalVariant()


def _positions(t: torch.Tensor, features: int) -> int:
    """Positions per sample of ``t`` (batch first) carrying ``features`` values each (1 for an empty or unbatched t)."""
    return max(1, t.numel() // max(1, t.shape[0] * features)) if t.dim() > 1 else 1


class Rule:
    """Base class: which modules a rule accepts and its two statistics."""

    base: type = nn.Module

    def accepts(self, module: nn.Module) -> bool:
        return _is_plain(module, self.base) and _only_weight_bias(module)

    def grad_stat(self, module, calls, stat: str, budget_bytes: int, state: dict) -> dict[str, torch.Tensor]:
        """One pass. ``calls``: list of (input, grad_output) pairs → {"weight": Σₙ f(g), "bias": ...}
        for what is complete after this pass; partial sums for :meth:`finish` may go to ``state``."""
        raise NotImplementedError

    def finish(
        self, module, inputs: list[torch.Tensor], stat: str, budget_bytes: int, state: dict
    ) -> dict[str, torch.Tensor]:
        """After the last pass of a batch: the statistics summed in ``state`` (``inputs``: the calls' inputs)."""
        return {}

    def signal(self, module, inp: torch.Tensor, out: torch.Tensor, v: SignalVariant = PAPER) -> dict[str, torch.Tensor]:
        """Additive contribution of one call to the signal statistic (the bias's from ``out``, the pre-activation)."""
        raise NotImplementedError

    def bias_signal(self, module, t: torch.Tensor, v: SignalVariant = PAPER) -> torch.Tensor:
        """Σₙ (1/Pₙ)^[mean] Σₚ power(t) per bias element, for ``t`` shaped like the layer's output
        (its pre-activation output, or what the activation that consumes it made of it)."""
        raise NotImplementedError


class LinearRule(Rule):
    """``y = W a + b`` on inputs (B, d_in) or (B, …, d_in).

    Per sample: ∂ℓₙ/∂W = Σ_t gₙₜ aₙₜᵀ, ∂ℓₙ/∂b = Σ_t gₙₜ. One position (B, d): the outer-product
    identity Σₙ(gₙaₙᵀ)² = (G∘G)ᵀ(A∘A), Σₙ|gₙaₙᵀ| = |G|ᵀ|A| (no per-sample tensor; several passes
    are summed on the G side first, one GEMM per batch). Several positions: per-sample Gₙᵀ Aₙ by
    batched matmul in cache-sized chunks, squared while in cache (see :func:`weight_stat`).

    Signal: weight w_ji → |w_ji|·Σₙ Σ_t |aₙₜᵢ| (input units × weight units); bias b_j →
    Σₙ Σ_t |yₙₜⱼ| (the layer's output y, or φ(y) for the activation φ that consumes it: see
    ``SignalEngine``; output units). Positions t: the tokens of an input (B, …, d_in), every axis
    between the first and the last (one for a (B, d_in) input); other variants: module docstring.
    """

    base = nn.Linear

    @staticmethod
    def _inputs(module, inputs):
        A = _cat_positions([wide(a).reshape(a.shape[0], -1, module.in_features) for a in inputs])  # (B, T, i)
        return lambda s, e: A[s:e].unsqueeze(1)

    def grad_stat(self, module, calls, stat, budget_bytes, state):
        f = stat_fn(stat)
        G = _cat_positions([wide(g).reshape(g.shape[0], -1, module.out_features) for _, g in calls])  # (B, T, o)
        out: dict[str, torch.Tensor] = {}
        if module.weight.requires_grad:
            w = weight_stat(
                G.transpose(1, 2).unsqueeze(1),
                self._inputs(module, [a for a, _ in calls]),
                module.in_features,
                stat,
                budget_bytes,
                state,
            )
            if w is not None:
                out["weight"] = w[0]
        if module.bias is not None:
            out["bias"] = f(G.sum(1)).sum(0)
        return out

    def finish(self, module, inputs, stat, budget_bytes, state):
        if "weight" not in state:
            return {}
        w = finish_weight_stat(state["weight"], self._inputs(module, inputs), module.in_features, stat, budget_bytes)
        return {"weight": w[0]}

    def signal(self, module, inp, out, v=PAPER):
        a = v.per_sample(v.power(inp).reshape(-1, module.in_features).sum(0), _positions(inp, module.in_features))
        res = {"weight": v.weight(module.weight) * a[None, :]}
        if module.bias is not None:
            res["bias"] = self.bias_signal(module, out, v)
        return res

    def bias_signal(self, module, t, v=PAPER):
        return v.per_sample(v.power(t).reshape(-1, module.out_features).sum(0), _positions(t, module.out_features))


class ConvRule(Rule):
    """Conv1d/Conv2d with any stride, padding (incl. "same" and non-zero padding modes), dilation
    and groups: with input patches Pₙ (L, k·C_in) and output gradient Gₙ (C_out, L), per group
    ∂ℓₙ/∂W = Gₙ Pₙ; bias Σ_L Gₙ. The patches are built for one cache-sized chunk of samples at a
    time, from a channels-last copy of the chunk's input (contiguous runs of C_in values, unlike
    ``unfold``), and the per-sample products are squared while in cache (see :func:`weight_stat`).

    Signal (generalisation of the paper's linear-layer rule): weight w[o,c,kh,kw] →
    |w[o,c,kh,kw]|·Σₙ Σ_positions |patch value at (c,kh,kw)| — the column sums of |unfold(x)|
    (after padding) for the input channels of o's group, i.e. the total absolute input that was
    multiplied by that weight; bias → Σₙ Σ_positions |yₙ,o| (pre-activation output). Positions:
    the L output positions of a call (padding included in the patches); ``mean`` divides by L.
    """

    base = (nn.Conv1d, nn.Conv2d)

    def accepts(self, module):
        return any(_is_plain(module, b) for b in self.base) and _only_weight_bias(module)

    @staticmethod
    def _geometry(module):
        if isinstance(module, nn.Conv1d):
            return (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        return tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)

    @staticmethod
    def _pads(module) -> list[int]:
        """F.pad's amounts, last axis first: [left, right] (Conv1d) or [left, right, top, bottom]."""
        pads = getattr(module, "_reversed_padding_repeated_twice", None)
        return list(pads) if pads is not None else [p for p in reversed(module.padding) for _ in range(2)]

    def _padded(self, module, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it: padding applied, Conv1d as a 2-d input (B, C, 1, W)."""
        pads = self._pads(module)
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pads, mode=mode)
        return x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x

    def _padded_channels_last(self, module, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_padded` as a contiguous (B, H, W, C) tensor. Zero padding is written with the copy
        (a zeroed buffer, the input copied into its interior), not padded first and then copied."""
        pads = self._pads(module)
        if module.padding_mode != "zeros" or not any(pads):
            return self._padded(module, x).permute(0, 2, 3, 1).contiguous()
        x = x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x
        left, right, top, bottom = (pads + [0, 0])[:4]
        n, c, h, w = x.shape
        xc = x.new_zeros(n, top + h + bottom, left + w + right, c)
        xc[:, top : top + h, left : left + w].copy_(x.permute(0, 2, 3, 1))
        return xc

    def patches(self, module, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in·kh·kw, L) input patches as seen by the convolution (padding applied)."""
        kernel, stride, dilation = self._geometry(module)
        return F.unfold(self._padded(module, x), kernel, dilation=dilation, stride=stride)

    def patches_by_position(self, module, x: torch.Tensor) -> torch.Tensor:
        """(B, groups, L, kh·kw·C_in/groups) input patches, each row a position's receptive field
        in (kh, kw, channel) order: one gather copy from a padded channels-last copy of ``x``."""
        xc = self._padded_channels_last(module, x)  # (B, H, W, C)
        (kh, kw), (sh, sw), (dh, dw) = self._geometry(module)
        n, h, w, c = xc.shape
        g = module.groups
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        s_n, s_h, s_w, _ = xc.stride()
        view = xc.as_strided(
            (n, oh, ow, kh, kw, g, c // g),
            (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, c // g, 1),
            xc.storage_offset(),
        )
        return view.permute(0, 5, 1, 2, 3, 4, 6).reshape(n, g, oh * ow, kh * kw * (c // g))

    def seen(self, module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """(L, kh·kw) bool over the calls' positions (in :meth:`_inputs`' order) and kernel offsets: False where
        the patch entries are zero padding whatever the input; None when there is none (the patches of an
        all-ones input: padding modes other than zeros repeat the input, so they are never zero)."""
        (kh, kw), stride, dilation = self._geometry(module)
        masks = []
        for a in inputs:
            ones = torch.ones(1, 1, *a.shape[2:], device=a.device)
            cols = F.unfold(self._padded(module, ones), (kh, kw), dilation=dilation, stride=stride)  # (1, kh·kw, L)
            masks.append(cols[0].t() > 0)
        mask = torch.cat(masks, 0)
        return None if bool(mask.all()) else mask

    def _inputs(self, module, inputs):
        """``inputs(s, e)``: the patches of samples s..e−1 of every call, made for those samples only (a
        padded channels-last copy of a chunk stays in cache for the gather; of a whole batch it would not)."""
        return lambda s, e: _cat_positions([self.patches_by_position(module, wide(a[s:e])) for a in inputs], 2)

    def _weight(self, module, w: torch.Tensor) -> torch.Tensor:
        """(g, o/g, kh·kw·C/g) in patch order → the weight's shape (o, C/g, kh, kw)."""
        (kh, kw), _, _ = self._geometry(module)
        g = module.groups
        return w.reshape(g, module.out_channels // g, kh, kw, -1).permute(0, 1, 4, 2, 3).reshape(module.weight.shape)

    def grad_stat(self, module, calls, stat, budget_bytes, state):
        f = stat_fn(stat)
        c_out, g = module.out_channels, module.groups
        (kh, kw), _, _ = self._geometry(module)
        batch = calls[0][1].shape[0]
        G = _cat_positions([wide(gr).reshape(batch, g, c_out // g, -1) for _, gr in calls], 3)  # (B, g, o/g, L)
        out = {}
        if module.weight.requires_grad:
            w = weight_stat(
                G,
                self._inputs(module, [a for a, _ in calls]),
                module.in_channels // g * kh * kw,
                stat,
                budget_bytes,
                state,
            )
            if w is not None:
                out["weight"] = self._weight(module, w)
        if module.bias is not None:
            out["bias"] = f(G.sum(-1)).sum(0).reshape(c_out)
        return out

    def finish(self, module, inputs, stat, budget_bytes, state):
        if "weight" not in state:
            return {}
        (kh, kw), _, _ = self._geometry(module)
        i = module.in_channels // module.groups * kh * kw
        return {
            "weight": self._weight(
                module,
                finish_weight_stat(
                    state["weight"], self._inputs(module, inputs), i, stat, budget_bytes, self.seen(module, inputs)
                ),
            )
        }

    def signal(self, module, inp, out, v=PAPER):
        g = module.groups
        patches = self.patches(module, wide(inp))  # (B, C_in·k, L)
        col = v.per_sample(v.power(patches).sum(dim=(0, 2)), patches.shape[2])  # (C_in·k,)
        col = col.reshape(g, 1, -1).expand(g, module.out_channels // g, col.numel() // g)
        res = {"weight": v.weight(module.weight) * col.reshape(module.weight.shape)}
        if module.bias is not None:
            res["bias"] = self.bias_signal(module, out, v)
        return res

    def bias_signal(self, module, t, v=PAPER):
        return v.per_sample(_abs_sum_except(v.power(t), 1), _positions(t, module.out_channels))


class _NormRule(Rule):
    """Affine normalisation ``y = γ·x̂ + β`` where x̂ is recomputed from the saved input.

    Per sample: ∂ℓₙ/∂γ = Σ_positions Gₙ·x̂ₙ, ∂ℓₙ/∂β = Σ_positions Gₙ (materialised: only
    B × #features values). Signal (the linear rule applied to the diagonal map x̂ ↦ γ·x̂):
    γ → |γ|·Σₙ Σ_positions |x̂| (x̂ is unitless), β → Σₙ Σ_positions |y| (output units); the
    positions are those that share one γ (spatial positions, tokens).
    """

    def normalized(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, module, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (B, …) over positions → (B, *param_shape)."""
        param = module.weight if module.weight is not None else module.bias
        return t.reshape(t.shape[0], param.shape[0], -1).sum(-1)

    def weight_grads(self, module, a: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
        """Per-sample ∂ℓ/∂γ (B, *param_shape) from the input ``a`` and output gradient ``gr``."""
        return self.per_sample(module, gr * self.normalized(module, a))

    def grad_stat(self, module, calls, stat, budget_bytes, state):
        f = stat_fn(stat)
        gw = gb = 0
        for a, gr in calls:
            gr = wide(gr)
            if module.weight is not None and module.weight.requires_grad:
                # In cache-sized chunks of samples: the temporaries stay small and in cache.
                step = chunk_size(2 * a[:1].numel(), budget_bytes, a.shape[0], working_set=True, device=a.device)
                gw = gw + torch.cat(
                    [
                        self.weight_grads(module, wide(a[s : s + step]), gr[s : s + step])
                        for s in range(0, a.shape[0], step)
                    ]
                )
            if module.bias is not None:
                gb = gb + self.per_sample(module, gr)
        out = {}
        if module.weight is not None and module.weight.requires_grad:
            out["weight"] = f(gw).sum(0)
        if module.bias is not None:
            out["bias"] = f(gb).sum(0)
        return out

    def _features(self, module) -> int:
        return (module.weight if module.weight is not None else module.bias).numel()

    def signal(self, module, inp, out, v=PAPER):
        res = {}
        if module.weight is not None:
            xhat = v.power(self.normalized(module, wide(inp)))
            total = v.per_sample(self.per_sample(module, xhat).sum(0), _positions(inp, self._features(module)))
            res["weight"] = v.weight(module.weight) * total
        if module.bias is not None:
            res["bias"] = self.bias_signal(module, out, v)
        return res

    def bias_signal(self, module, t, v=PAPER):
        return v.per_sample(self.per_sample(module, v.power(t)).sum(0), _positions(t, self._features(module)))


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
    samples of a batch; the engine then uses its per-sample fallback for the whole model.

    The per-sample γ gradient Σ_positions Gₙ,c·x̂ₙ,c = (Σ_positions Gₙ,c·(xₙ,c − μ_c))/σ_c is one
    batched dot product per (sample, channel) on the centred input, without forming x̂·G."""

    base = nn.modules.batchnorm._BatchNorm

    def accepts(self, module):
        return (
            super().accepts(module)
            and module.affine
            and not module.training
            and module.running_mean is not None
            and module.running_var is not None
        )

    def normalized(self, module, x):
        return F.batch_norm(x, wide(module.running_mean), wide(module.running_var), None, None, False, 0.0, module.eps)

    def weight_grads(self, module, a, gr):
        batch, c = gr.shape[:2]
        mean, var = wide(module.running_mean).to(a.dtype), wide(module.running_var).to(a.dtype)
        centred = (a.reshape(batch, c, -1) - mean[:, None]).unsqueeze(-1)  # (B, C, L, 1)
        dots = torch.matmul(gr.reshape(batch, c, 1, -1), centred)[..., 0, 0]  # (B, C): Σ_L G·(x − μ)
        return dots * torch.rsqrt(var + module.eps)


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

    Signal: the linear rule with a one-hot input: row v → |w_v|·(number of look-ups of v); the
    positions are a sample's look-ups (``mean``: look-ups of v per look-up; ``l2``: |w_v|·√count).
    """

    base = nn.Embedding

    def accepts(self, module):
        return super().accepts(module) and module.max_norm is None and not module.scale_grad_by_freq

    def grad_stat(self, module, calls, stat, budget_bytes, state):
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

    def signal(self, module, inp, out, v=PAPER):
        counts = torch.bincount(inp.reshape(-1), minlength=module.num_embeddings).to(wide_dtype(module.weight.dtype))
        counts = v.per_sample(counts, _positions(inp, 1))
        return {"weight": v.weight(module.weight) * counts[:, None]}


RULES: tuple[Rule, ...] = (LinearRule(), ConvRule(), LayerNormRule(), BatchNormRule(), GroupNormRule(), EmbeddingRule())


#: where activation modules live: torch's and timm's (GELU, QuickGELU, Swish, … are re-implemented there)
_ACTIVATION_HOMES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me")


def is_activation(module: nn.Module) -> bool:
    """A parameter-free element-wise activation module (ReLU, LeakyReLU, GELU, SiLU, Tanh, Softmax, …)."""
    return type(module).__module__ in _ACTIVATION_HOMES and not any(True for _ in module.parameters(recurse=False))


def rule_for(module: nn.Module) -> Rule | None:
    """The rule that handles ``module`` exactly, or None (its parameters go to the fallback)."""
    if not any(True for _ in module.parameters(recurse=False)):
        return None
    for rule in RULES:
        if rule.accepts(module):
            return rule
    return None
