"""Synaptic Intelligence (Zenke et al. 2017) path-integral importance, accumulated during training.

For every optimiser step t with task-loss gradient gₜ and update Δθₜ:

    W += −gₜ·Δθₜ                                  (loss units: the step's first-order loss drop)
    Ω  = max(W, 0) / ((θ_end − θ_start)² + ξ)      (loss units / parameter-unit²)

θ_start is the parameter value when the accumulator was created (start of the task), θ_end the
value when :meth:`SIAccumulator.omega` is called. gₜ is the gradient of the task loss alone, as
in Zenke et al.'s own implementation (the unregularised loss): ``train-next`` calls
:meth:`~SIAccumulator.pre_step` before it adds the penalty's gradient and before clipping, so an
importance measures how much the new task's loss fell along each parameter, not the tug-of-war
between the task and the penalty of earlier tasks. W can be negative (a step that increased the
first-order loss, e.g. momentum overshoot or noise); a negative weight would *reward* moving a
parameter in a quadratic penalty, so it is clamped to 0. Everything is kept in float32. A step
the fp16 grad scaler skips (gₜ not finite, Δθₜ = 0) adds exactly 0: the term is taken as 0
wherever Δθₜ = 0, so inf·0 never enters W.
"""

from __future__ import annotations

import torch

from cl_tool.errors import IncompatibleError, UsageError
from cl_tool.importance.checks import check_finite


class SIAccumulator:
    """Accumulate W over the optimiser steps of one task; call pre_step/post_step around step()."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], xi: float = 0.1):
        if not xi > 0:
            raise UsageError(f"The SI damping xi must be positive, got {xi}.")
        self.params = {n: p for n, p in dict(named_params).items() if p.requires_grad}
        self.xi = float(xi)
        self.start = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.W = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        self._before: dict[str, torch.Tensor] | None = None
        self._grads: dict[str, torch.Tensor] | None = None

    def pre_step(self, grads: dict[str, torch.Tensor] | None = None) -> None:
        """Remember θ (before ``optimizer.step()``) and g for :meth:`post_step`.

        g is ``grads`` (by parameter name) if given, else a copy of ``p.grad`` as it is now:
        call this after the task loss's backward pass and before anything else (a penalty's
        gradient, clipping) changes ``p.grad``.
        """
        self._before = {n: p.detach().float().clone() for n, p in self.params.items()}
        if grads is None:
            grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        self._grads = {n: g.detach().float().clone() for n, g in grads.items() if n in self.params}

    def post_step(self) -> None:
        """W += −g·Δθ with g recorded by :meth:`pre_step` and Δθ = θ_after − θ_before."""
        if self._before is None or self._grads is None:
            raise RuntimeError("SIAccumulator.post_step() called without pre_step().")
        for n, p in self.params.items():
            g = self._grads.get(n)
            if g is not None:  # a parameter that did not move adds 0, even where g overflowed (a skipped fp16 step)
                delta = p.detach().float() - self._before[n]
                self.W[n].sub_(torch.where(delta != 0, g.detach().float() * delta, 0.0))
        self._before = self._grads = None

    def omega(self, check: bool = True) -> dict[str, torch.Tensor]:
        """Ω = max(W, 0) / ((θ_now − θ_start)² + ξ), float32 on CPU (``check``: raise if not finite)."""
        out = {}
        for n, p in self.params.items():
            drift = p.detach().float() - self.start[n]
            out[n] = (self.W[n].clamp(min=0) / (drift.square() + self.xi)).cpu()
        return check_finite(out) if check else out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``W.<name>``, ``start.<name>`` and ``xi`` (0-d) as CPU tensors, for resuming."""
        sd = {f"W.{n}": t.cpu().clone() for n, t in self.W.items()}
        sd.update({f"start.{n}": t.cpu().clone() for n, t in self.start.items()})
        sd["xi"] = torch.tensor(self.xi, dtype=torch.float64)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore W, θ_start and ξ; raises IncompatibleError if names or shapes differ."""
        expected = {f"{kind}.{n}" for n in self.params for kind in ("W", "start")} | {"xi"}
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
            raise IncompatibleError(
                f"The SI state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})."
            )
        for n, p in self.params.items():
            for kind, store in (("W", self.W), ("start", self.start)):
                t = sd[f"{kind}.{n}"]
                if tuple(t.shape) != tuple(p.shape):
                    raise IncompatibleError(
                        f"The SI state for {n!r} has shape {tuple(t.shape)} but the parameter has {tuple(p.shape)}."
                    )
                store[n] = t.detach().to(device=p.device, dtype=torch.float32).clone()
        self.xi = float(sd["xi"])
        self._before = self._grads = None
