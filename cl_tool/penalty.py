"""The EWC family of quadratic penalties  P(θ) = Σᵢ cᵢ·(θᵢ − θ*ᵢ)².

θ* are the anchor parameters (the checkpoint training starts from), Ω the importances
(units of Ω: 1/parameter² per unit of loss, e.g. Fisher information), λ ≥ 0 the strength.

- ``ewc`` (Kirkpatrick et al. 2017):            c = λ·Ω / 2
- ``stabilized`` (Kutalev & Lapina 2021):        c = λ·Ω / (2·(1 + η·λ·Ω))
- ``online-ewc``: ``ewc`` with Ω = γ·Ω_prev + Ω_new accumulated by ``importance --decay γ``
- ``none``: c = 0

Why the stabilized form: one SGD step on the penalty alone moves θ − θ* by the factor
(1 − 2ηc). For plain EWC that is (1 − ηλΩ), which oscillates with growing amplitude once
ηλΩ > 2 (divergence); for the stabilized c it is 1/(1 + ηλΩ) ∈ (0, 1], so a step can never
overshoot θ*, whatever λ. η is the learning rate in force at the step (after warm-up and
schedule). For SGD the bound is exact; for Adam/AdamW η is the nominal step size (Adam's
per-parameter step is ≈ η in magnitude), so the same formula bounds its steps heuristically.

The penalty's gradient 2c(θ − θ*) is added to ``.grad`` after the task loss's backward pass
with fused ``torch._foreach`` ops (no autograd graph, no Python loop per element), always in
float32, after any grad-scaler unscale. :func:`coefficients` is the one place the formulas live.
"""

from __future__ import annotations

from typing import Any

PENALTIES = ("stabilized", "ewc", "online-ewc", "none")


def coefficients(kind: str, omegas: list[Any], lam: float, lr: float) -> list[Any]:
    """c for each Ω tensor: ``ewc``/``online-ewc`` c = λΩ/2; ``stabilized`` c = λΩ / (2(1 + ηλΩ)); ``none`` c = 0.

    Units: Ω in loss per parameter-unit², λ dimensionless, η (``lr``) in parameter-units² per loss
    unit per step, so ηλΩ is dimensionless and c has Ω's units.
    """
    import torch

    if kind == "none" or not omegas:
        return [torch.zeros_like(o) for o in omegas]
    lo = torch._foreach_mul(omegas, float(lam))  # λΩ
    if kind == "stabilized":
        return torch._foreach_div(
            lo, torch._foreach_mul(torch._foreach_add(torch._foreach_mul(lo, float(lr)), 1.0), 2.0)
        )
    return torch._foreach_mul(lo, 0.5)


def divergence_bound(omega_max: float, lam: float, lr: float) -> float:
    """η·λ·max Ω; plain EWC under SGD diverges on the penalty alone once this is ≥ 2."""
    return float(lr) * float(lam) * float(omega_max)


class QuadraticPenalty:
    """Holds θ*, Ω and the coefficients for a list of parameters (same order as ``params``)."""

    def __init__(self, kind: str, params: list[Any], anchors: list[Any], omegas: list[Any], lam: float):
        import torch

        if kind not in PENALTIES:
            raise ValueError(kind)
        self.kind = kind
        self.lam = float(lam)
        self.params = params
        self.anchors = [a.detach().to(p.device, torch.float32).clone() for a, p in zip(anchors, params)]
        self.omegas = [o.detach().to(p.device, torch.float32).clone() for o, p in zip(omegas, params)]
        self._lr: float | None = None
        self._coef: list[Any] = []
        self.active = kind != "none" and self.lam > 0

    def omega_max(self) -> float:
        return max((float(o.max()) for o in self.omegas if o.numel()), default=0.0)

    def _coefficients(self, lr: float) -> list[Any]:
        if lr != self._lr:
            self._coef, self._lr = coefficients(self.kind, self.omegas, self.lam, lr), lr
        return self._coef

    def add_gradient_(self, lr: float) -> None:
        """``p.grad += 2c(θ − θ*)`` for every parameter (creates zero grads where missing)."""
        if not self.active:
            return
        import torch

        coef = self._coefficients(lr)
        with torch.no_grad():
            grads = []
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            diffs = torch._foreach_sub([p.detach().float() for p in self.params], self.anchors)
            if all(g.dtype == torch.float32 for g in grads):
                torch._foreach_addcmul_(grads, coef, diffs, value=2.0)
            else:
                for g, c, d in zip(grads, coef, diffs):
                    g.add_((2.0 * c * d).to(g.dtype))

    def value(self, lr: float) -> float:
        """P(θ) = Σ c(θ − θ*)² as a Python float (float32 accumulation)."""
        if not self.active:
            return 0.0
        import torch

        coef = self._coefficients(lr)
        with torch.no_grad():
            diffs = torch._foreach_sub([p.detach().float() for p in self.params], self.anchors)
            terms = torch._foreach_mul(torch._foreach_mul(diffs, diffs), coef)
            return float(sum(t.sum() for t in terms))
