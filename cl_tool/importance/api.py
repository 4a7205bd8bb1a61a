"""Weight importances for EWC-style regularisation and pruning (Kutalev & Lapina 2021).

Public API (re-exported by ``cl_tool.importance``):

* :func:`importance_sums` — Σₙ of a per-sample statistic for every trainable parameter, and N.
* :func:`finalize_importance` — turns sums into importances (mean for fisher/mas).
* :func:`compute_importance` — both in one call.
* :class:`SIAccumulator` — Synaptic Intelligence, accumulated during training.

Methods (per sample n, ℓₙ the per-sample loss, gₙ = ∂ℓₙ/∂θ, see ``losses``):

* ``fisher``: Σₙ gₙ², ℓₙ = −log p(yₙ|xₙ) (label modes: ``losses``); ``mas``: Σₙ |gₙ|, ℓₙ = ‖o(xₙ)‖₂², o = logits or
  softmax. Finalised: the mean over samples (Fisher: nats² per parameter-unit²).
* ``signal`` (paper §4): |w|·(total absolute input signal that reached w over the data), bias:
  total absolute output of its unit, after the activation that consumes it (``bias_score``
  ``post-activation``, the authors' code; softmax for the classifier) or before it
  (``pre-activation``); a total over samples, not a mean (see ``rules`` and ``SignalEngine``).
  ``signal_norm`` ``sum`` (the paper) totals a sample's positions (tokens, conv output positions),
  ``mean`` averages them; ``signal_stat`` ``l1`` (the paper) sums |a|, ``l2`` takes √(Σ a²) of
  the input (Wanda's |w|·‖X‖₂). ``importance_sums`` returns the additive sums (l2: squared),
  ``finalize_importance(..., signal_stat=)`` the statistic; the formulas per layer are in ``rules``.
* ``magnitude``: |w|; needs no data (count 0).

The exact per-sample engine is described in ``engine`` (hooks + layer rules + exact fallback).
All statistics are accumulated in float32 and returned on the CPU, whatever ``precision`` the
forward pass ran in. The model's ``.grad`` fields are not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from cl_tool.errors import BadInputError, UsageError
from cl_tool.importance import METHODS, METHODS_BY_NAME, SIGNAL_STATS, Method
from cl_tool.importance.checks import check_finite
from cl_tool.importance.engine import GradEngine, SignalEngine
from cl_tool.importance.losses import LossSpec
from cl_tool.importance.si import SIAccumulator as SIAccumulator  # re-exported by cl_tool.importance
from cl_tool.runtime import PRECISIONS
from cl_tool.runtime import autocast as autocast_context


def _method(name: str) -> Method:
    """The record of a method computed from data or weights (UsageError otherwise)."""
    m = METHODS_BY_NAME.get(name)
    if m is not None and m.source == "training":
        raise UsageError(
            "SI importances are accumulated during training (SIAccumulator), not computed from data afterwards."
        )
    if m is None:
        raise UsageError(f"$method {name} is unknown; use one of {', '.join(METHODS)}.")
    return m


def _autocast(device: torch.device, precision: str):
    """A factory of the forward pass's autocast context (:func:`cl_tool.runtime.autocast`)."""
    if precision not in PRECISIONS:
        raise UsageError(f"$precision {precision} is unknown; use one of {', '.join(PRECISIONS)}.")
    return partial(autocast_context, device, precision)


@contextmanager
def _eval_on(model: nn.Module, device: torch.device):
    """Eval mode and ``device`` for the block; every module's mode and the device restored after."""
    modes = [(m, m.training) for m in model.modules()]
    first = next(model.parameters(), None)
    old_device = first.device if first is not None else device
    move = not _same_device(old_device, device)
    model.eval()
    if move:
        model.to(device)
    try:
        yield
    finally:
        if move:
            model.to(old_device)
        for m, mode in modes:
            m.training = mode


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current device) count as the same."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _batch_tensors(batch, device: torch.device):
    try:
        x, y = batch
    except (TypeError, ValueError) as exc:
        raise BadInputError("Each batch must be a pair (inputs, labels).") from exc
    return x.to(device, non_blocking=True), (y.to(device) if isinstance(y, torch.Tensor) else y)


def importance_sums(
    model: nn.Module,
    batches: Iterable,
    method: str,
    *,
    fisher_labels: str = "empirical",
    mas_output: str = "logits",
    bias_score: str = "post-activation",
    signal_norm: str = "sum",
    signal_stat: str = "l1",
    device="cpu",
    precision: str = "fp32",
    memory_budget_mb: float = 512,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σₙ of the per-sample statistic of ``method`` for every trainable parameter, and N.

    ``batches`` yields (x, y): x already normalised, y int64 labels (used by fisher/empirical
    only). Results are float32 CPU tensors keyed by ``model.named_parameters()`` names (frozen
    parameters are left out). ``memory_budget_mb`` bounds the per-sample gradient tensors that
    are materialised at once (activations of one batch come on top). The model runs in eval mode
    (BatchNorm on running statistics, dropout off) on ``device``; its modes and device are
    restored afterwards. ``progress(n)`` is called after each batch with its sample count.
    ``bias_score`` (signal only): ``post-activation`` or ``pre-activation`` (see ``SignalEngine``);
    ``signal_norm`` (``sum``/``mean``) and ``signal_stat`` (``l1``/``l2``): the signal variant (signal only).
    Raises BadInputError naming the parameter if a result is not finite.
    """
    m = _method(method)
    device = torch.device(device)
    if m.source == "weights":
        return check_finite(
            {n: p.detach().float().abs().cpu() for n, p in model.named_parameters() if p.requires_grad}
        ), 0
    autocast = _autocast(device, precision)
    spec = None if m.loss is None else LossSpec(method, fisher_labels, mas_output)
    if not float(memory_budget_mb) > 0:
        raise UsageError(f"$memory_budget_mb must be positive, got {memory_budget_mb}.")
    budget = max(1, int(float(memory_budget_mb) * (1 << 20)))
    count = 0
    with _eval_on(model, device):
        if spec is None:
            engine = SignalEngine(
                model, autocast=autocast, bias_score=bias_score, signal_norm=signal_norm, signal_stat=signal_stat
            )
        else:
            engine = GradEngine(
                model,
                spec,
                autocast=autocast,
                budget_bytes=budget,
                generator=generator,
                scale_cotangents=precision == "fp16",
                tune_threads=device.type == "cpu",
            )
        for batch in batches:
            x, y = _batch_tensors(batch, device)
            if x.shape[0] == 0:
                continue
            if spec is None:
                engine.add_batch(x)
            else:
                engine.add_batch(x, y)
            count += x.shape[0]
            if progress is not None:
                progress(x.shape[0])
        sums = engine.result() if spec is None else engine.sums
    return check_finite({n: t.float().cpu() for n, t in sums.items()}), count


def finalize_importance(
    sums: dict[str, torch.Tensor], count: int, method: str, *, signal_stat: str = "l1"
) -> dict[str, torch.Tensor]:
    """Importances from sums: fisher/mas → sums / N (per-sample mean); magnitude and signal l1 → as is; signal l2 →
    √sums (the sums of squares are summed over batches and processes first)."""
    m = _method(method)
    variant = "signal_stat" in m.options
    if variant and signal_stat not in SIGNAL_STATS:
        raise UsageError(f"$signal_stat {signal_stat} is unknown; use one of {', '.join(SIGNAL_STATS)}.")
    if m.reduce == "mean":
        if count <= 0:
            raise BadInputError(
                f"No samples were seen, so the {method} importance is undefined; give a non-empty dataset."
            )
        out = {n: t.float() / float(count) for n, t in sums.items()}
    elif variant and signal_stat == "l2":
        out = {n: t.float().sqrt() for n, t in sums.items()}
    else:
        out = {n: t.float().clone() for n, t in sums.items()}
    return check_finite(out)


def compute_importance(model: nn.Module, batches: Iterable, method: str, **kwargs) -> dict[str, torch.Tensor]:
    """``finalize_importance(*importance_sums(model, batches, method, **kwargs), method, signal_stat=...)``."""
    sums, count = importance_sums(model, batches, method, **kwargs)
    return finalize_importance(sums, count, method, signal_stat=kwargs.get("signal_stat", "l1"))
