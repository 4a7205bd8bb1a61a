"""Pruning by importance: choose prunable tensors, compute keep-masks, apply them.

Kutalev & Lapina (2021, arXiv 2109.10021) prune the weights with the lowest importance
(EWC/Fisher importances, or |w| as a baseline) either over the whole network ("global"
scope) or tensor by tensor ("layer" scope). This module implements that selection
exactly and deterministically:

* **How many.** For ``N`` scored elements and sparsity ``s`` (``0 <= s < 1``) exactly
  ``k = floor(s * N + 1/2)`` elements are pruned (round half up). ``s`` is taken as the
  decimal it prints as (``0.9`` means 9/10, not the nearest binary float), so e.g. 25 %
  of 10 elements prunes 3 and 90 % of 86 567 656 prunes 77 910 890. In layer scope the
  same rule is applied to each tensor's own element count, so a tensor of 1 element at
  ``s >= 0.5`` is pruned entirely.
* **Which.** The ``k`` elements with the lowest score are pruned (mask ``False``); every
  other element is kept (mask ``True``). Ties are broken deterministically: among equal
  scores, elements of earlier tensors (in the dict's order) and then lower flat (row-major)
  indices are pruned first. The result is identical to taking the first ``k`` positions
  of a *stable* ascending sort of the concatenation of all flattened scores in dict order.
  ``-0.0`` and ``+0.0`` count as equal; ``±inf`` are ordinary values; NaN is refused
  (:class:`~cl_tool.errors.BadInputError` naming the tensor).
* **Scale.** Nothing is concatenated or sorted globally. The k-th smallest score ``v`` is
  found by counting, tensor by tensor, how many scores are ``<= x`` for probe values
  ``x``: two probes bracketing the target rank in a seeded random sample of 2**17 scores
  (Floyd–Rivest style), up to 8 pairs of sample-guided probes that isolate one sampled
  value (this settles heavy ties in two counts), then bisection on the order-preserving
  integer key of the float bit pattern (at most 33 more passes for float32, 65 for
  float64). Typically 2 counting passes suffice. As soon as the bracket holds at most
  ``max(largest tensor, 2**20)`` elements they are copied out and a selection
  (``numpy.partition`` on CPU, ``torch.kthvalue`` elsewhere) finishes the job. Then
  ``m = k - #{score < v}`` elements equal to ``v`` are pruned in (tensor, flat index)
  order. Extra memory besides the returned masks is a few times the largest single
  tensor (timings: ``tests/benchmarks/bench_prune_core.py``).

Scores may be any real dtype; float16/bfloat16/float32 are compared in float32,
float64 and integer scores in float64 (integers above 2**53 lose exactness).
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import struct
from fractions import Fraction
from typing import Iterable, Mapping, NamedTuple

import torch

from cl_tool.errors import BadInputError, IncompatibleError, UsageError

# Parameter-name patterns (fnmatch, matched against the lower-cased name) that are never
# pruned by default: embeddings and tokens (patch/position/word embeddings, class,
# distillation, register and mask tokens) and relative-position bias tables.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*embed*",
    "*cls_token*",
    "*dist_token*",
    "*reg_token*",
    "*mask_token*",
    "*pos_drop*",
    "*relative_position_bias_table*",
)

# Buffers that may appear in a state dict but are statistics, not weights: never selected.
_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

_CHUNK = 1 << 20          # elements per chunk when locating the n-th tie
_SAMPLE = 1 << 17         # size of the random sample that brackets the threshold
_MIN_CAP = 1 << 20        # bracket size (elements) below which candidates are copied out
_GUIDED = 8               # at most this many sample-guided probe pairs before plain bisection


# ----------------------------------------------------------------------------- selection


def _matches(name: str, patterns: Iterable[str], *, lower: bool = False) -> bool:
    key = name.lower() if lower else name
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _guess_classifier(named_params: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    last = None
    for name, t in named_params.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim >= 2:
            last = name
    if last is None:
        return ()
    if "." not in last:
        return (last,)
    prefix = last.rsplit(".", 1)[0] + "."
    return tuple(n for n in named_params if n.startswith(prefix) and "." not in n[len(prefix):])


def select_prunable(
    named_params: Mapping[str, torch.Tensor],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    include_bias: bool = False,
    include_norm: bool = False,
    include_classifier: bool = False,
    classifier_names: tuple[str, ...] | None = None,
) -> list[str]:
    """Names of the tensors to prune, in the order of ``named_params``.

    Default rule (no ``include``): weight matrices and convolution kernels only, i.e.
    floating tensors with ``ndim >= 2``, except names matching :data:`DEFAULT_EXCLUDE`
    (embeddings, class/position tokens; matched case-insensitively) and except the
    classifier. ``include_bias`` adds tensors whose name ends in ``bias``;
    ``include_norm`` adds the other 1-D tensors (norm weights, layer-scale gammas);
    ``include_classifier`` keeps the classifier in.

    The classifier is ``classifier_names`` (exact parameter names, or module names whose
    ``<module>.`` parameters are meant; see :func:`classifier_param_names`). When
    ``classifier_names`` is ``None`` it is guessed as the last tensor with ``ndim >= 2``
    in dict order plus its sibling parameters (``head.weight`` and ``head.bias``); pass
    ``()`` to declare that there is none.

    ``include`` / ``exclude`` are lists of fnmatch glob patterns over parameter names
    (case-sensitive). When ``include`` is given it replaces the default rule: exactly the
    tensors matching an include pattern are selected (explicit include wins over the
    defaults and the flags). ``exclude`` then removes matching names (exclude wins over
    include). A pattern matching no name at all raises :class:`UsageError` (likely a
    typo), as does a selection that ends up empty. Integer tensors and BatchNorm running
    statistics are never selected.
    """
    names = list(named_params)
    for opt, pats in (("$include", include), ("$exclude", exclude)):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise UsageError(f"{opt} pattern {pat!r} matches no parameter name of the model; check the spelling against the model's parameter names.")

    if classifier_names is None:
        classifier_names = _guess_classifier(named_params)
    cls_exact = set(classifier_names)
    cls_prefixes = tuple(c + "." for c in classifier_names)

    def is_classifier(n: str) -> bool:
        return n in cls_exact or n.startswith(cls_prefixes)

    selected = []
    for name, t in named_params.items():
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point()):
            continue
        if name.endswith(_STAT_SUFFIXES):
            continue
        if include:
            chosen = _matches(name, include)
        else:
            if _matches(name, DEFAULT_EXCLUDE, lower=True):
                chosen = False
            elif is_classifier(name) and not include_classifier:
                chosen = False
            elif t.ndim >= 2:
                chosen = True
            elif name.endswith("bias"):
                chosen = include_bias
            else:
                chosen = include_norm
        if chosen and exclude and _matches(name, exclude):
            chosen = False
        if chosen:
            selected.append(name)
    if not selected:
        raise UsageError("No parameter is selected for pruning; adjust $include/$exclude or $include_bias/$include_norm/$include_classifier.")
    return selected


# ----------------------------------------------------------------------------- counting


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float; UsageError unless ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise UsageError(f"$sparsity must be in [0, 1), got {sparsity!r}.")
    return float(sparsity)


def num_to_prune(numel: int, sparsity: float) -> int:
    """``k = floor(s * numel + 1/2)``, computed exactly on the decimal value of ``s`` (``0 <= s < 1``)."""
    s = Fraction(repr(float(sparsity)))
    return math.floor(s * numel + Fraction(1, 2))


class _Keys:
    """Order-preserving map between floats of one width and Python ints (bit patterns)."""

    def __init__(self, dtype: torch.dtype):
        if dtype == torch.float64:
            self.ffmt, self.ifmt, self.mag = "<d", "<q", (1 << 63) - 1
        else:
            self.ffmt, self.ifmt, self.mag = "<f", "<i", (1 << 31) - 1

    def key(self, x: float) -> int:
        b = struct.unpack(self.ifmt, struct.pack(self.ffmt, x))[0]
        return b if b >= 0 else b ^ self.mag

    def value(self, key: int) -> float:
        b = key if key >= 0 else key ^ self.mag
        return struct.unpack(self.ffmt, struct.pack(self.ifmt, b))[0]


def _compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    wide = False
    for t in tensors:
        if t.dtype == torch.float64 or not t.is_floating_point():
            wide = True
    return torch.float64 if wide else torch.float32


def _validated(scores: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], torch.dtype]:
    items = []
    for name, t in scores.items():
        if not isinstance(t, torch.Tensor):
            raise BadInputError(f"The scores for {name!r} are not a tensor; the importance file is malformed.")
        if t.is_complex():
            raise BadInputError(f"The scores for {name!r} are complex numbers; importances must be real.")
        items.append((name, t.detach()))
    return items, _compute_dtype(t for _, t in items)


def _as(t: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """``t`` in the compute dtype (a temporary copy only for other dtypes)."""
    return t if t.dtype == cdtype else t.to(cdtype)


def _flat(t: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """``t`` flattened in row-major order, in the compute dtype."""
    return _as(t.reshape(-1), cdtype)


def _check_nan_minmax(items, cdtype) -> tuple[float, float] | None:
    lo = hi = None
    for name, t in items:
        if t.numel() == 0:
            continue
        mn, mx = torch.aminmax(_flat(t, cdtype))
        mn, mx = mn.item(), mx.item()
        if math.isnan(mn) or math.isnan(mx):
            raise BadInputError(f"The scores for {name!r} contain NaN; recompute the importances (the run that produced them probably diverged).")
        lo = mn if lo is None else min(lo, mn)
        hi = mx if hi is None else max(hi, mx)
    return None if lo is None else (lo, hi)


def _count_le(ts: list[torch.Tensor], x: float, cdtype: torch.dtype) -> int:
    return sum(int((_as(t, cdtype) <= x).sum()) for t in ts)


def _sample(ts: list[torch.Tensor], total: int, cdtype: torch.dtype) -> torch.Tensor:
    """A sorted, seeded random sample of about ``total`` values, stratified by tensor size."""
    gen = torch.Generator().manual_seed(0)
    parts = []
    n_all = sum(t.numel() for t in ts)
    for t in ts:
        n = t.numel()
        s = max(1, min(n, round(total * n / n_all)))
        idx = torch.randint(0, n, (s,), generator=gen)
        parts.append(_as(t.reshape(-1)[idx.to(t.device)], cdtype).cpu())
    return torch.cat(parts).sort().values


def _kth_smallest(ts: list[torch.Tensor], k: int, cdtype: torch.dtype, lo_val: float, hi_val: float) -> tuple[float, int, list[int] | None]:
    """Return ``(v, #{x < v}, eq)`` where ``v`` is the k-th smallest (1-based) of all values.

    ``ts`` are non-empty tensors without NaN whose overall minimum and maximum are
    ``lo_val`` and ``hi_val``; ``1 <= k <= total number of elements``. ``eq[i]`` is the
    number of elements of ``ts[i]`` equal to ``v`` when it came for free, else None.
    """
    keys = _Keys(cdtype)
    n_all = sum(t.numel() for t in ts)
    cap = max(_MIN_CAP, max(t.numel() for t in ts))
    lo, c_lo, lo_virtual = keys.key(lo_val) - 1, 0, True     # invariant: #{<= value(lo)} < k
    hi, c_hi = keys.key(hi_val), n_all                         # invariant: #{<= value(hi)} >= k

    probes: list[int] = []
    smp: list[float] = []
    if n_all > cap and _SAMPLE > 0:
        smp = _sample(ts, _SAMPLE, cdtype).tolist()
        s = len(smp)
        p = k / n_all
        d = 4.0 * math.sqrt(s * p * (1.0 - p)) + 2.0
        a = smp[max(0, min(s - 1, math.floor(p * s - d)))]
        b = smp[max(0, min(s - 1, math.ceil(p * s + d)))]
        # Bracket [a, b]: count just below a and up to b (Floyd-Rivest style).
        probes = [keys.key(a) - 1, keys.key(b)]
    guided = 0

    while True:
        if hi - lo <= 1:
            return keys.value(hi), c_lo, None
        if c_hi - c_lo <= cap:
            break
        probe = None
        while probes and probe is None:
            q = probes.pop(0)
            if lo < q < hi:
                probe = q
        if probe is None and smp and guided < _GUIDED:
            # The bracket is still large (ties, or the sample missed): take the sampled
            # value u at the target rank inside the bracket and isolate it by counting just
            # below u and up to u. A heavily tied u is settled by these two counts.
            lo_v = -math.inf if lo_virtual else keys.value(lo)
            hi_v = keys.value(hi)
            i0, i1 = bisect.bisect_right(smp, lo_v), bisect.bisect_right(smp, hi_v)
            if i1 > i0:
                guided += 1
                q = (k - c_lo) / (c_hi - c_lo)
                u = smp[min(i1 - 1, i0 + int(q * (i1 - i0)))]
                probes = [keys.key(u) - 1, keys.key(u)]
                continue
        if probe is None:
            probe = lo + (hi - lo) // 2
        c = _count_le(ts, keys.value(probe), cdtype)
        if c >= k:
            hi, c_hi = probe, c
        else:
            lo, c_lo, lo_virtual = probe, c, False

    hi_v = keys.value(hi)
    lo_v = None if lo_virtual else keys.value(lo)
    if c_hi - c_lo == n_all and len(ts) == 1:
        cand = _flat(ts[0], cdtype)            # the whole (single) tensor: no copy needed
        bounds = [0, n_all]
    else:
        cand = torch.empty(c_hi - c_lo, dtype=cdtype, device=ts[0].device)
        bounds = [0]
        for t in ts:
            f = _as(t, cdtype)
            if c_hi - c_lo == n_all:
                vals = f.reshape(-1)
            else:
                sel = f <= hi_v
                if lo_v is not None:
                    sel &= f > lo_v
                vals = f[sel]
                del sel
            pos = bounds[-1]
            cand[pos:pos + vals.numel()] = vals.to(cand.device)
            bounds.append(pos + vals.numel())
            del f, vals
    assert bounds[-1] == cand.numel()
    v = _kth_value(cand, k - c_lo)
    c_lt = c_lo + int((cand < v).sum())
    # Every element equal to v lies in the bracket, so the segments give the tie counts.
    eq = [int((cand[a:b] == v).sum()) for a, b in zip(bounds, bounds[1:])]
    return v, c_lt, eq


def _kth_value(x: torch.Tensor, r: int) -> float:
    """The r-th smallest (1-based) element of the 1-D tensor ``x`` (introselect)."""
    if x.device.type == "cpu":
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            return float(np.partition(x.numpy(), r - 1)[r - 1])
    return x.kthvalue(r).values.item()


def _nth_true(flat_bool: torch.Tensor, n: int) -> int:
    """Flat index of the n-th (1-based) True element, scanning in chunks."""
    for start in range(0, flat_bool.numel(), _CHUNK):
        chunk = flat_bool[start:start + _CHUNK]
        c = int(chunk.sum())
        if c >= n:
            return start + int(chunk.nonzero()[n - 1, 0])
        n -= c
    raise AssertionError("fewer True elements than expected")


def _select(items: list[tuple[str, torch.Tensor]], k: int, cdtype: torch.dtype, minmax) -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly the k lowest scores (ties: earlier tensor, lower index)."""
    if k <= 0:
        return {name: torch.ones(t.shape, dtype=torch.bool, device=t.device) for name, t in items}
    nonempty = [t for _, t in items if t.numel()]
    v, c_lt, eq_counts = _kth_smallest(nonempty, k, cdtype, *minmax)
    eq_iter = iter(eq_counts) if eq_counts is not None else None
    remaining = k - c_lt                       # elements equal to v still to prune
    masks = {}
    for name, t in items:
        if t.numel() == 0:
            masks[name] = torch.ones(t.shape, dtype=torch.bool, device=t.device)
            continue
        f = _flat(t, cdtype)
        known = next(eq_iter) if eq_iter is not None else None
        if remaining == 0:
            keep = f >= v
        elif known is not None and known <= remaining:
            keep = f > v
            remaining -= known
        else:
            keep = f > v
            eq = f == v
            e = int(eq.sum()) if known is None else known
            if e <= remaining:
                remaining -= e
            else:
                p = _nth_true(eq, remaining)
                keep[p + 1:] |= eq[p + 1:]
                remaining = 0
            del eq
        masks[name] = keep.view(t.shape)
        del f
    assert remaining == 0
    return masks


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` = keep) pruning the ``k = floor(s*N + 1/2)`` lowest scores overall.

    ``N`` is the total number of elements of all tensors in ``scores``. Ties are pruned in
    (dict order, flat index) order, i.e. exactly the first ``k`` entries of a stable
    ascending sort of ``torch.cat([t.flatten() for t in scores.values()])``. Masks have
    the shapes and devices of the score tensors, in the same order. Raises
    :class:`UsageError` for a sparsity outside ``[0, 1)`` and :class:`BadInputError` for
    NaN scores.
    """
    s = check_sparsity(sparsity)
    items, cdtype = _validated(scores)
    minmax = _check_nan_minmax(items, cdtype)
    n_all = sum(t.numel() for _, t in items)
    return _select(items, num_to_prune(n_all, s), cdtype, minmax)


@torch.no_grad()
def layer_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the ``k_i = floor(s*N_i + 1/2)`` lowest scores of each tensor ``i``.

    Ties within a tensor are pruned in flat-index order (a stable ascending sort of the
    flattened tensor). Same errors as :func:`global_masks`.
    """
    s = check_sparsity(sparsity)
    items, _ = _validated(scores)
    masks = {}
    for name, t in items:
        cdtype = _compute_dtype([t])
        minmax = _check_nan_minmax([(name, t)], cdtype)
        masks.update(_select([(name, t)], num_to_prune(t.numel(), s), cdtype, minmax))
    return masks


@torch.no_grad()
def apply_masks(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Zero, in place, the elements of ``state[name]`` where ``masks[name]`` is False.

    ``state`` is a state dict or a dict of parameters (a ``model.state_dict()`` shares
    storage with the model, so the model is pruned too). Returns ``{name: fraction of
    the tensor's elements that are masked out}`` for every masked tensor. Raises
    :class:`IncompatibleError` if a mask has no tensor of the same name and shape.
    """
    report = {}
    for name, mask in masks.items():
        t = state.get(name)
        if t is None:
            raise IncompatibleError(f"The mask for {name!r} has no matching tensor in the model; the scores belong to another model.")
        if tuple(t.shape) != tuple(mask.shape):
            raise IncompatibleError(f"The mask for {name!r} has shape {tuple(mask.shape)} but the tensor has {tuple(t.shape)}; the scores belong to another model.")
        keep = mask.to(device=t.device, dtype=torch.bool)
        t.masked_fill_(keep.logical_not(), 0)
        n = keep.numel()
        report[name] = (n - int(keep.sum())) / n if n else 0.0
    return report


class SparsityRow(NamedTuple):
    name: str
    numel: int
    pruned: int
    fraction: float


def sparsity_report(masks: Mapping[str, torch.Tensor]) -> tuple[list[SparsityRow], SparsityRow]:
    """Per-tensor rows ``(name, numel, pruned, fraction)`` and a ``"total"`` row.

    ``pruned`` counts mask entries that are False; ``fraction = pruned / numel``
    (0.0 for an empty tensor).
    """
    rows = []
    tot_n = tot_p = 0
    for name, mask in masks.items():
        n = mask.numel()
        p = n - int(mask.sum())
        rows.append(SparsityRow(name, n, p, p / n if n else 0.0))
        tot_n += n
        tot_p += p
    return rows, SparsityRow("total", tot_n, tot_p, tot_p / tot_n if tot_n else 0.0)
