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
* **Scale.** Nothing is concatenated or sorted globally (:class:`CutPlanner`). A first read
  of every score tensor takes its range and a seeded random sample (2**19 scores over all
  tensors, stratified by size); its values at the ranks ``p·s ∓ (4·sqrt(s·p·(1−p)) + 2)``
  bracket the k-th smallest score ``v`` (Floyd–Rivest). A second read counts the scores below
  the bracket and copies out those inside it (at most ``max(largest tensor, 2**20)``);
  ``numpy.partition`` of the copies gives ``v`` and each tensor's count below and equal to it.
  A bracket that misses k or holds too many (heavy ties) falls back to counting reads: up to 8
  pairs of sample-guided probes that isolate one sampled value (this settles heavy ties in two
  counts), then bisection on the order-preserving integer key of the float bit pattern (at
  most 33 more reads for float32, 65 for float64). Then ``m = k - #{score < v}`` elements
  equal to ``v`` are pruned in (tensor, flat index) order.
* **Streaming.** The selection reads the scores through *sources* (name, shape, dtype, a
  loader of the values, optionally of consecutive pieces), one tensor or piece at a time:
  :func:`plan_masks` finds each tensor's cut (threshold and number of ties to prune), after
  which any tensor's mask follows from its own scores alone, in any order and piece by piece
  (:class:`MaskPlan`), so scores and masks can stay on disk: extra memory is a few pieces and
  the bracket's copies. A caller that reads the tensors anyway hands the first read to
  :meth:`CutPlanner.observe`. :func:`global_masks` and :func:`layer_masks` are the in-memory
  API over torch tensors or numpy arrays.
* **Output scope.** :func:`output_masks` (in memory only) applies the rule to each output row of a
  tensor with ``ndim >= 2`` — the slice ``t[j]``: a Linear weight's row j (the weights into unit j), a
  conv kernel's output channel j (all its C_in/groups·kh·kw weights) — and to each 1-D tensor as a whole:
  ``k = floor(s·n_row + 1/2)`` per row, ties pruned at lower indices first (a stable argsort of the row).
* **LAMP scope.** :func:`lamp_masks` (in memory only) ranks globally by each score's layer-adaptive
  normalisation (Lee et al. 2021): within a tensor, sorted ascending, ``u ↦ s_u² / Σ_{v ≥ u} s_v²`` (the
  score's square over the squares of itself and every score above it in that tensor), so every tensor's top
  score is 1 and keeps at least one element below 100 % sparsity. With ``s = |w|`` this is LAMP itself.

Scores may be any real dtype; float16/bfloat16/float32 are compared in float32,
float64 and integer scores in float64 (integers above 2**53 lose exactness). The selection
is numpy; torch is only imported for torch inputs and :func:`apply_masks`.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any, NamedTuple

from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.models import guess_classifier_names
from cl_tool.safetensors_io import is_float


class TensorInfo(NamedTuple):
    """What selection needs of a tensor without its values: shape and dtype name (``float32``, ``int64``...)."""

    shape: tuple[int, ...]
    dtype: str


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

_CHUNK = 1 << 20  # elements per chunk when locating the n-th tie
_SAMPLE = 1 << 19  # size of the random sample that brackets the threshold (2 MiB of float32)
_MIN_CAP = 1 << 20  # bracket size (elements) below which candidates are copied out
_GUIDED = 8  # at most this many sample-guided probe pairs before plain bisection


# ----------------------------------------------------------------------------- selection


def _matches(name: str, patterns: Iterable[str], *, lower: bool = False) -> bool:
    key = name.lower() if lower else name
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def select_prunable(
    named_params: Mapping[str, Any],
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
    ``classifier_names`` is ``None`` it is guessed from the names (:func:`guess_classifier_names`);
    pass ``()`` to declare that there is none.

    ``include`` / ``exclude`` are lists of fnmatch glob patterns over parameter names
    (case-sensitive). When ``include`` is given it replaces the default rule: exactly the
    tensors matching an include pattern are selected (explicit include wins over the
    defaults and the flags). ``exclude`` then removes matching names (exclude wins over
    include). A pattern matching no name at all raises :class:`UsageError` (likely a
    typo), as does a selection that ends up empty. Integer tensors and BatchNorm running
    statistics are never selected. Values may be torch tensors, numpy arrays or
    :class:`TensorInfo` (shape and dtype name only).
    """
    names = list(named_params)
    for opt, pats in (("$include", include), ("$exclude", exclude)):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise UsageError(
                    f"{opt} pattern {pat!r} matches no parameter name of the model; check the spelling against the model's parameter names."
                )

    if classifier_names is None:
        classifier_names = guess_classifier_names(named_params)
    cls_exact = set(classifier_names)
    cls_prefixes = tuple(c + "." for c in classifier_names)

    def is_classifier(n: str) -> bool:
        return n in cls_exact or n.startswith(cls_prefixes)

    selected = []
    for name, t in named_params.items():
        if not is_float(t):
            continue
        if name.endswith(_STAT_SUFFIXES):
            continue
        if include:
            chosen = _matches(name, include)
        else:
            if _matches(name, DEFAULT_EXCLUDE, lower=True) or is_classifier(name) and not include_classifier:
                chosen = False
            elif len(t.shape) >= 2:
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
        raise UsageError(
            "No parameter is selected for pruning; adjust $include/$exclude or $include_bias/$include_norm/$include_classifier."
        )
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

    def __init__(self, dtype: str):
        if dtype == "float64":
            self.ffmt, self.ifmt, self.mag = "<d", "<q", (1 << 63) - 1
        else:
            self.ffmt, self.ifmt, self.mag = "<f", "<i", (1 << 31) - 1

    def key(self, x: float) -> int:
        b = struct.unpack(self.ifmt, struct.pack(self.ffmt, x))[0]
        return b if b >= 0 else b ^ self.mag

    def value(self, key: int) -> float:
        b = key if key >= 0 else key ^ self.mag
        return struct.unpack(self.ffmt, struct.pack(self.ifmt, b))[0]


# ----------------------------------------------------------------------------- score sources


class Source(NamedTuple):
    """One tensor of scores: its name, shape, numpy dtype and a loader of its values (any real dtype).

    ``pieces``, when given, yields the same values flat in consecutive pieces (a file read in chunks); the
    selection then never holds more than one piece of a tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], Any]
    pieces: Callable[[], Iterable[Any]] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _compute_dtype(dtypes: Iterable[Any]) -> str:
    """float64 when any score is float64 or an integer, else float32."""
    import numpy as np

    return "float64" if any(np.dtype(d) == np.float64 or np.dtype(d).kind in "iub" for d in dtypes) else "float32"


def _flat(src: Source, cdtype: str):
    """The source's scores, flat, in the compute dtype (a copy only for another dtype)."""
    import numpy as np

    values = np.asarray(src.load()).reshape(-1)
    return values if values.dtype == np.dtype(cdtype) else values.astype(cdtype)


def _pieces(src: Source, cdtype: str) -> Iterable[Any]:
    """The source's scores, flat, in the compute dtype: piece by piece when it reads in pieces, else whole."""
    import numpy as np

    if src.pieces is None:
        yield _flat(src, cdtype)
        return
    for piece in src.pieces():
        piece = np.asarray(piece).reshape(-1)
        yield piece if piece.dtype == np.dtype(cdtype) else piece.astype(cdtype)


def _nan_error(name: str) -> BadInputError:
    return BadInputError(
        f"The scores for {name!r} contain NaN; recompute the importances (the run that produced them probably diverged)."
    )


def _count_le(sources: list[Source], x: float, cdtype: str) -> int:
    import numpy as np

    return sum(int(np.count_nonzero(f <= x)) for src in sources for f in _pieces(src, cdtype))


class _Bracket(NamedTuple):
    """Search state of :func:`_kth_smallest`: ``#{<= value(lo)} = c_lo < k <= c_hi = #{<= value(hi)}`` (keys)."""

    lo: int
    c_lo: int
    lo_virtual: bool  # value(lo) lies below every score (it is not a score bound to be compared against)
    hi: int
    c_hi: int


def _kth_smallest(
    sources: list[Source], k: int, cdtype: str, start: _Bracket, smp: list[float]
) -> tuple[float, int, list[int] | None]:
    """Return ``(v, #{x < v}, eq)`` where ``v`` is the k-th smallest (1-based) of all values.

    ``sources`` are non-empty and without NaN; ``start`` brackets the k-th value; ``smp`` is a sorted
    sample of the values (may be empty). ``eq[i]`` is the number of elements of ``sources[i]`` equal to
    ``v`` when it came for free, else None. Counting passes until the bracket holds at most the
    candidate cap, then one gathering pass and ``numpy.partition``.
    """
    import numpy as np

    keys = _Keys(cdtype)
    n_all = sum(src.numel for src in sources)
    cap = max(_MIN_CAP, max(src.numel for src in sources))
    lo, c_lo, lo_virtual, hi, c_hi = start
    probes: list[int] = []
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
                probes = [keys.key(-0.0 if u == 0 else u) - 1, keys.key(0.0 if u == 0 else u)]
                continue
        if probe is None:
            probe = lo + (hi - lo) // 2
        c = _count_le(sources, keys.value(probe), cdtype)
        if c >= k:
            hi, c_hi = probe, c
        else:
            lo, c_lo, lo_virtual = probe, c, False

    hi_v = keys.value(hi)
    lo_v = None if lo_virtual else keys.value(lo)
    cand = np.empty(c_hi - c_lo, dtype=cdtype)
    bounds = [0]
    for src in sources:
        pos = bounds[-1]
        for f in _pieces(src, cdtype):
            if c_hi - c_lo != n_all:
                sel = f <= hi_v
                if lo_v is not None:
                    sel &= f > lo_v
                f = f[sel]
            cand[pos : pos + f.size] = f
            pos += f.size
        bounds.append(pos)
    assert bounds[-1] == cand.size
    v = float(np.partition(cand, k - c_lo - 1)[k - c_lo - 1])
    c_lt = c_lo + int(np.count_nonzero(cand < v))
    # Every element equal to v lies in the bracket, so the segments give the tie counts.
    eq = [int(np.count_nonzero(cand[a:b] == v)) for a, b in zip(bounds, bounds[1:])]
    return v, c_lt, eq


def _nth_true(flat_bool, n: int) -> int:
    """Flat index of the n-th (1-based) True element, scanning in chunks."""
    import numpy as np

    for start in range(0, flat_bool.size, _CHUNK):
        chunk = flat_bool[start : start + _CHUNK]
        c = int(np.count_nonzero(chunk))
        if c >= n:
            return start + int(np.flatnonzero(chunk)[n - 1])
        n -= c
    raise AssertionError("fewer True elements than expected")


class _Cut(NamedTuple):
    """How one tensor is cut: scores below ``threshold`` are pruned, and the first ``ties`` scores equal to it."""

    threshold: float | None  # None: keep everything
    ties: int
    cdtype: str
    pruned: int


class MaskPlan:
    """The exact cut of every source, computed once (:func:`plan_masks`); masks then come one tensor at a time.

    Each tensor's mask depends only on its own scores and its cut, so masks can be produced in any
    order and more than once, and nothing but one tensor's scores (or one piece of them) is held at a time.
    """

    def __init__(self, cuts: dict[str, _Cut]):
        self.cuts = cuts

    def pruned(self, name: str) -> int:
        return self.cuts[name].pruned

    def mask(self, src: Source):
        """The keep-mask (numpy bool, the source's shape) of ``src``."""
        import numpy as np

        out = np.ones(src.numel, dtype=bool)
        if self.cuts[src.name].threshold is None or src.numel == 0:
            return out.reshape(src.shape)
        keep, pos = self.keeper(src.name), 0
        for f in _pieces(src, self.cuts[src.name].cdtype):
            keep(f, out[pos : pos + f.size])
            pos += f.size
        return out.reshape(src.shape)

    def keeper(self, name: str) -> Callable[..., Any]:
        """``keep(values, out=None)``: the flat keep-mask of the next piece of source ``name``'s scores.

        Pieces are fed in flat order; the ties to prune are the first ones met. ``out``: a flat bool array of
        the piece's size to write into (the caller's reused buffer).
        """
        import numpy as np

        cut = self.cuts[name]
        ties_left = cut.ties

        def keep(values: Any, out: Any = None):
            nonlocal ties_left
            f = np.asarray(values).reshape(-1)
            if out is None:
                out = np.empty(f.size, dtype=bool)
            if cut.threshold is None:
                out[...] = True
                return out
            if f.dtype != np.dtype(cut.cdtype):
                f = f.astype(cut.cdtype)
            if ties_left == 0:
                return np.greater_equal(f, cut.threshold, out=out)
            np.greater(f, cut.threshold, out=out)
            eq = f == cut.threshold
            n_eq = int(np.count_nonzero(eq))
            if ties_left < n_eq:  # the tie that is cut lies in this piece: ties after it are kept
                p = _nth_true(eq, ties_left)
                out[p + 1 :] |= eq[p + 1 :]
            ties_left -= min(ties_left, n_eq)
            return out

        return keep


class _Seen(NamedTuple):
    """What the first read of a source found: its least and greatest score and a random sample (None when empty)."""

    lo: float | None
    hi: float | None
    sample: Any


class _Group(NamedTuple):
    """Sources cut together: all of them in global scope, one in layer scope."""

    sources: list[Source]
    k: int
    cdtype: str


class CutPlanner:
    """The exact cut of every source (:class:`MaskPlan`), usually in two reads of each score tensor.

    Read 1 (:meth:`observe`): each source's NaN check, least and greatest score and, when its group
    holds more than the candidate cap, a seeded random sample (2**19 scores over the group,
    stratified by tensor size). A caller that reads the tensors anyway (the streaming prune checks
    and hashes every tensor of the checkpoint first) pushes the scores in there; :meth:`plan` reads
    the sources nobody pushed. Read 2 (:meth:`plan`): the sample brackets the k-th score ``v``
    (Floyd–Rivest: ``a``, ``b`` at the sample ranks ``p·s ∓ (4·sqrt(s·p·(1−p)) + 2)``); one pass
    counts the scores below ``a`` and copies out those in ``[a, b]`` (at most the cap), and
    ``numpy.partition`` of the copies gives ``v``, each tensor's count below ``v`` and its ties. A
    bracket that misses ``k`` or holds more than the cap (a heavy tie that is not settled by
    ``a == b``) falls back to counting probes (:func:`_kth_smallest`), which always ends.
    """

    def __init__(self, sources: list[Source], sparsity: float, scope: str):
        s = check_sparsity(sparsity)
        if scope == "layer":
            self.groups = [_Group([src], num_to_prune(src.numel, s), _compute_dtype([src.dtype])) for src in sources]
        else:
            self.groups = [
                _Group(
                    list(sources),
                    num_to_prune(sum(src.numel for src in sources), s),
                    _compute_dtype(src.dtype for src in sources),
                )
            ]
        self.sources = {src.name: src for src in sources}
        self._index = {src.name: i for i, src in enumerate(sources)}
        self._cdtype: dict[str, str] = {}
        self._sample_size: dict[str, int] = {}
        for group in self.groups:
            n_all = sum(src.numel for src in group.sources)
            sampled = group.k > 0 and n_all > _cap(group.sources) and _SAMPLE > 0
            for src in group.sources:
                self._cdtype[src.name] = group.cdtype
                share = max(1, min(src.numel, round(_SAMPLE * src.numel / n_all))) if sampled and src.numel else 0
                self._sample_size[src.name] = share
        self._seen: dict[str, _Seen] = {}
        self._partial: dict[str, dict[str, Any]] = {}

    def observe(self, name: str, values: Any, start: int = 0) -> None:
        """Read 1 of source ``name`` from its scores ``values``: the whole tensor, or flat pieces in order, the piece
        beginning at flat index ``start``. Names that are not sources, and sources already seen whole, are ignored."""
        import numpy as np

        if name not in self.sources or name in self._seen:
            return
        f = np.asarray(values).reshape(-1)
        cdtype = self._cdtype[name]
        if f.dtype != np.dtype(cdtype):
            f = f.astype(cdtype)
        numel = self.sources[name].numel
        state = self._partial.get(name)
        if state is None or start != state["next"]:  # a new reading of the tensor begins
            size = self._sample_size[name]
            at = np.random.default_rng([0, self._index[name]]).integers(0, numel, size) if size else np.zeros(0, int)
            state = self._partial[name] = {"next": 0, "lo": math.inf, "hi": -math.inf, "at": np.sort(at), "parts": []}
            if start != 0:
                raise ValueError(f"the scores of {name!r} must be observed from flat index 0, in order")
        if f.size:
            lo, hi = float(np.min(f)), float(np.max(f))
            if math.isnan(lo) or math.isnan(hi):
                raise _nan_error(name)
            state["lo"], state["hi"] = min(state["lo"], lo), max(state["hi"], hi)
            at = state["at"]
            i0, i1 = np.searchsorted(at, [start, start + f.size])
            if i1 > i0:
                state["parts"].append(f[at[i0:i1] - start])
        state["next"] = start + f.size
        if state["next"] >= numel:
            del self._partial[name]
            parts = state["parts"]
            sample = np.concatenate(parts) if parts else f[:0].copy()
            self._seen[name] = _Seen(state["lo"], state["hi"], sample) if numel else _Seen(None, None, sample)

    def plan(self) -> MaskPlan:
        """The cuts; reads every source not yet observed once, then every source of a group with ``k > 0`` once more."""
        for src in self.sources.values():
            if src.name not in self._seen:
                self._partial.pop(src.name, None)
                start = 0
                for f in _pieces(src, self._cdtype[src.name]):
                    self.observe(src.name, f, start)
                    start += f.size
                if src.name not in self._seen:  # an empty tensor that yielded no piece
                    self.observe(src.name, [])
        cuts: dict[str, _Cut] = {}
        for group in self.groups:
            cuts.update(self._cuts(group))
        return MaskPlan(cuts)

    def _cuts(self, group: _Group) -> dict[str, _Cut]:
        """The cuts pruning exactly the ``k`` lowest scores of the group (ties: earlier source, lower index)."""
        import numpy as np

        sources, k, cdtype = group
        cuts = {src.name: _Cut(None, 0, cdtype, 0) for src in sources}
        nonempty = [src for src in sources if src.numel]
        if k <= 0 or not nonempty:
            return cuts
        keys = _Keys(cdtype)
        n_all, cap = sum(src.numel for src in nonempty), _cap(nonempty)
        lo_val = min(self._seen[src.name].lo for src in nonempty)
        hi_val = max(self._seen[src.name].hi for src in nonempty)
        smp = np.sort(np.concatenate([self._seen[src.name].sample for src in nonempty])) if n_all > cap else None
        full = _Bracket(keys.key(lo_val) - 1, 0, True, keys.key(hi_val), n_all)
        if n_all <= cap:
            a, b = lo_val, hi_val
        elif smp is not None and smp.size:
            s, p = smp.size, k / n_all
            d = 4.0 * math.sqrt(s * p * (1.0 - p)) + 2.0
            a = float(smp[max(0, min(s - 1, math.floor(p * s - d)))])
            b = float(smp[max(0, min(s - 1, math.ceil(p * s + d)))])
        else:  # sampling off: probes from the whole range
            return self._finish(nonempty, k, cdtype, _kth_smallest(nonempty, k, cdtype, full, []), cuts)

        # One pass: below a, and the scores in [a, b] (copied while they fit the cap).
        below, inside, parts, bounds = [], [], [], [0]
        gathering, gathered = True, 0
        for src in nonempty:
            n_below = n_inside = 0
            for f in _pieces(src, cdtype):
                n_below += int(np.count_nonzero(f < a))
                if a == b:
                    n_inside += int(np.count_nonzero(f == a))
                    continue
                sel = f >= a
                sel &= f <= b
                n_in = int(np.count_nonzero(sel))
                n_inside += n_in
                if gathering and gathered + n_in <= cap:
                    parts.append(f[sel])
                    gathered += n_in
                else:
                    gathering, parts = False, []
            below.append(n_below)
            inside.append(n_inside)
            bounds.append(gathered)
        c_lo = sum(below)
        c_hi = c_lo + sum(inside)
        if c_lo < k <= c_hi and (a == b or gathering):
            if a == b:
                v, eq = a, inside
            else:
                # The candidates, tensor after tensor (bounds); partitioned in a copy, so the segments still count.
                cand = np.concatenate(parts)
                del parts
                v = float(np.partition(cand, k - c_lo - 1)[k - c_lo - 1])
                segments = [cand[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
                below = [n + int(np.count_nonzero(seg < v)) for n, seg in zip(below, segments)]
                eq = [int(np.count_nonzero(seg == v)) for seg in segments]
            return _assign(nonempty, k, cdtype, v, below, eq, cuts)
        # The bracket is too full or misses k: count probes inside what is known.
        just_below_a = keys.key(-0.0 if a == 0 else a) - 1  # the float just below a: #{<= it} = #{< a}
        up_to_b = keys.key(0.0 if b == 0 else b)
        if k <= c_lo:
            start = full._replace(hi=just_below_a, c_hi=c_lo)
        elif k > c_hi:
            start = full._replace(lo=up_to_b, c_lo=c_hi, lo_virtual=False)
        else:
            start = _Bracket(just_below_a, c_lo, c_lo == 0, up_to_b, c_hi)
        found = _kth_smallest(nonempty, k, cdtype, start, smp.tolist() if smp is not None else [])
        return self._finish(nonempty, k, cdtype, found, cuts)

    @staticmethod
    def _finish(nonempty, k, cdtype, found, cuts) -> dict[str, _Cut]:
        """Cuts from ``(v, #{< v}, eq or None)``: a counting pass for each tensor's scores below (and equal to) ``v``."""
        import numpy as np

        v, _, eq_counts = found
        below, eq = [], []
        for i, src in enumerate(nonempty):
            n_below = n_eq = 0
            for f in _pieces(src, cdtype):
                n_below += int(np.count_nonzero(f < v))
                if eq_counts is None:
                    n_eq += int(np.count_nonzero(f == v))
            below.append(n_below)
            eq.append(n_eq if eq_counts is None else eq_counts[i])
        return _assign(nonempty, k, cdtype, v, below, eq, cuts)


def _cap(sources: list[Source]) -> int:
    """How many candidate scores may be copied out: the largest tensor, and at least ``_MIN_CAP``."""
    return max(_MIN_CAP, max((src.numel for src in sources), default=0))


def _assign(nonempty, k, cdtype, v, below, eq, cuts) -> dict[str, _Cut]:
    """Prune every score below ``v`` and the ``k - #{< v}`` first ties (earlier tensor, then lower index)."""
    remaining = k - sum(below)
    assert 0 < remaining <= sum(eq)
    for src, n_below, n_eq in zip(nonempty, below, eq):
        ties = min(remaining, n_eq)
        remaining -= ties
        cuts[src.name] = _Cut(v, ties, cdtype, n_below + ties)
    return cuts


def plan_masks(sources: list[Source], sparsity: float, scope: str) -> MaskPlan:
    """The exact cut of every source for ``sparsity`` in ``scope`` (:class:`CutPlanner`, reading every source).

    ``global``: ``k = floor(s*N + 1/2)`` of all ``N`` scores, ties pruned in (source order, flat
    index) order; ``layer``: the same rule within each source. Raises UsageError for a sparsity
    outside [0, 1) and BadInputError for NaN scores.
    """
    return CutPlanner(sources, sparsity, scope).plan()


def _in_memory(scores: Mapping[str, Any]) -> tuple[list[Source], Callable[[str, Any], Any]]:
    """Sources over in-memory torch tensors or numpy arrays, and how to turn a numpy mask back into the input's type."""
    import numpy as np

    sources, converters = [], {}
    for name, t in scores.items():
        if hasattr(t, "detach"):  # a torch tensor: masks come back as bool tensors on its device
            import torch

            if t.is_complex():
                raise BadInputError(f"The scores for {name!r} are complex numbers; importances must be real.")
            cpu = t.detach().cpu()
            array = (cpu.float() if cpu.dtype == torch.bfloat16 else cpu).numpy()
            converters[name] = lambda m, device=t.device: torch.from_numpy(m).to(device)
        elif isinstance(t, np.ndarray):
            if t.dtype.kind == "c":
                raise BadInputError(f"The scores for {name!r} are complex numbers; importances must be real.")
            array = t
            converters[name] = lambda m: m
        else:
            raise BadInputError(f"The scores for {name!r} are not a tensor; the importance file is malformed.")
        sources.append(Source(name, tuple(array.shape), str(array.dtype), lambda a=array: a))
    return sources, lambda name, mask: converters[name](mask)


def global_masks(scores: Mapping[str, Any], sparsity: float) -> dict[str, Any]:
    """Keep-masks (``True`` = keep) pruning the ``k = floor(s*N + 1/2)`` lowest scores overall.

    ``N`` is the total number of elements of all tensors in ``scores`` (torch tensors or numpy
    arrays). Ties are pruned in (dict order, flat index) order, i.e. exactly the first ``k``
    entries of a stable ascending sort of the concatenation of all flattened scores in dict
    order. Masks have the shapes (and, for torch, the devices) of the score tensors, in the same
    order. Raises :class:`UsageError` for a sparsity outside ``[0, 1)`` and
    :class:`BadInputError` for NaN scores.
    """
    return _masks(scores, sparsity, "global")


def layer_masks(scores: Mapping[str, Any], sparsity: float) -> dict[str, Any]:
    """Keep-masks pruning the ``k_i = floor(s*N_i + 1/2)`` lowest scores of each tensor ``i``.

    Ties within a tensor are pruned in flat-index order (a stable ascending sort of the
    flattened tensor). Same errors as :func:`global_masks`.
    """
    return _masks(scores, sparsity, "layer")


def output_masks(scores: Mapping[str, Any], sparsity: float) -> dict[str, Any]:
    """Keep-masks pruning the ``k = floor(s*n + 1/2)`` lowest scores of each output row (``t[j]`` of a tensor with
    ``ndim >= 2``, ``n`` its elements) and of each 1-D tensor as a whole.

    Ties within a row are pruned in flat-index order (a stable ascending sort of the row; ``-0.0`` equals ``+0.0``).
    Same errors as :func:`global_masks`; scores compared in the dtype :func:`global_masks` uses.
    """
    import numpy as np

    s = check_sparsity(sparsity)
    sources, back = _in_memory(scores)
    out = {}
    for src in sources:
        cdtype = _compute_dtype([src.dtype])
        f = _flat(src, cdtype)
        if np.isnan(f).any():
            raise _nan_error(src.name)
        n_rows = src.shape[0] if len(src.shape) >= 2 else 1
        rows = f.reshape(n_rows, math.prod(src.shape[1:]) if len(src.shape) >= 2 else src.numel) + 0.0  # -0.0 → +0.0
        k = num_to_prune(rows.shape[1], s)
        keep = np.ones(rows.shape, dtype=bool)
        if k and rows.size:
            lowest = np.argsort(rows, axis=1, kind="stable")[:, :k]
            np.put_along_axis(keep, lowest, False, axis=1)
        out[src.name] = back(src.name, keep.reshape(src.shape))
    return out


def lamp_scores(scores: Mapping[str, Any]) -> dict[str, Any]:
    """Each tensor's scores normalised by LAMP (Lee et al. 2021), float64 numpy, same shapes and order.

    In a tensor with scores sorted ascending ``s_(1) ≤ … ≤ s_(n)``: ``lamp(s_(i)) = s_(i)² / Σ_{j ≥ i} s_(j)²``,
    in [0, 1], 1 at the top score (0/0 → 0: an all-zero tensor); equal scores get the stable sort's order (the
    lower flat index first, hence the smaller value). Unitless, so one global threshold compares tensors.
    """
    import numpy as np

    sources, _ = _in_memory(scores)
    out = {}
    for src in sources:
        f = _flat(src, "float64")
        if np.isnan(f).any():
            raise _nan_error(src.name)
        order = np.argsort(f, kind="stable")
        sq = np.square(f[order])
        tail = np.cumsum(sq[::-1])[::-1]  # Σ_{j ≥ i} s_(j)²
        lamp = np.empty_like(sq)
        np.divide(sq, tail, out=lamp, where=tail > 0)
        lamp[tail <= 0] = 0.0
        normalised = np.empty_like(lamp)
        normalised[order] = lamp
        out[src.name] = normalised.reshape(src.shape)
    return out


def lamp_masks(scores: Mapping[str, Any], sparsity: float) -> dict[str, Any]:
    """Keep-masks pruning the ``k = floor(s*N + 1/2)`` lowest :func:`lamp_scores` overall (ties as
    :func:`global_masks`); masks in the input's type and device."""
    check_sparsity(sparsity)
    _, back = _in_memory(scores)
    masks = global_masks(lamp_scores(scores), sparsity)
    return {n: back(n, m) for n, m in masks.items()}


def _masks(scores: Mapping[str, Any], sparsity: float, scope: str) -> dict[str, Any]:
    check_sparsity(sparsity)
    sources, back = _in_memory(scores)
    plan = plan_masks(sources, sparsity, scope)
    return {src.name: back(src.name, plan.mask(src)) for src in sources}


def apply_masks(state: Mapping[str, Any], masks: Mapping[str, Any]) -> dict[str, float]:
    """Zero, in place, the elements of ``state[name]`` where ``masks[name]`` is False.

    ``state`` is a state dict or a dict of parameters (a ``model.state_dict()`` shares
    storage with the model, so the model is pruned too). Returns ``{name: fraction of
    the tensor's elements that are masked out}`` for every masked tensor. Raises
    :class:`IncompatibleError` if a mask has no tensor of the same name and shape.
    """
    import torch

    report = {}
    for name, mask in masks.items():
        t = state.get(name)
        if t is None:
            raise IncompatibleError(
                f"The mask for {name!r} has no matching tensor in the model; the scores belong to another model."
            )
        if tuple(t.shape) != tuple(mask.shape):
            raise IncompatibleError(
                f"The mask for {name!r} has shape {tuple(mask.shape)} but the tensor has {tuple(t.shape)}; the scores belong to another model."
            )
        keep = torch.as_tensor(mask).to(device=t.device, dtype=torch.bool)
        with torch.no_grad():
            t.masked_fill_(keep.logical_not(), 0)
        n = keep.numel()
        report[name] = (n - int(keep.sum())) / n if n else 0.0
    return report


class SparsityRow(NamedTuple):
    name: str
    numel: int
    pruned: int
    fraction: float


def sparsity_report(masks: Mapping[str, Any]) -> tuple[list[SparsityRow], SparsityRow]:
    """:func:`sparsity_rows` of keep-masks: ``pruned`` counts the entries that are False."""
    return sparsity_rows((name, math.prod(m.shape), math.prod(m.shape) - int(m.sum())) for name, m in masks.items())


def sparsity_rows(counts: Iterable[tuple[str, int, int]]) -> tuple[list[SparsityRow], SparsityRow]:
    """Per-tensor rows ``(name, numel, pruned, fraction)`` from ``(name, numel, pruned)`` and a ``"total"`` row;
    ``fraction = pruned / numel`` (0.0 for an empty tensor)."""
    rows = [SparsityRow(name, n, p, p / n if n else 0.0) for name, n, p in counts]
    n, p = sum(r.numel for r in rows), sum(r.pruned for r in rows)
    return rows, SparsityRow("total", n, p, p / n if n else 0.0)
