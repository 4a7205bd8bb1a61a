"""Per-sample losses whose gradients define the importance statistics.

Every gradient-based statistic is written as a sum over *passes* ``k`` of a per-sample scalar
loss ``ℓₙ⁽ᵏ⁾`` (shape ``(B, P)`` for a batch), and a per-element statistic ``f`` of its gradient:

    S(θ) = Σₙ Σₖ f(∂ℓₙ⁽ᵏ⁾/∂θ),   f = square (fisher) or abs (mas).

* ``fisher`` / ``empirical``: P = 1, ℓₙ = −log p(yₙ|xₙ) with the true label (nats).
* ``fisher`` / ``sampled``:   P = 1, the same with yₙ ~ softmax(f(xₙ)) drawn once per batch.
* ``fisher`` / ``exact``:     P = K (classes), ℓₙ⁽ʸ⁾ = √p(y|xₙ)·(−log p(y|xₙ)) with √p detached, so
  Σ_y (∂ℓₙ⁽ʸ⁾/∂θ)² = Σ_y p(y|xₙ)·gₙ,ᵧ² — the expectation of the squared score under the model.
  The logit gradients of these K losses are (up to sign) the columns of the symmetric factor
  S = diag(√p) − p√pᵀ of the softmax cross-entropy Hessian H = diag(p) − ppᵀ = SSᵀ, so the sum
  is also diag(Jᵀ H J) (J = ∂z/∂θ): the exact GGN diagonal (BackPACK's DiagGGNExact).
* ``mas``:                    P = 1, ℓₙ = ‖o(xₙ)‖₂² with o = logits or softmax (squared output units).

Fisher statistics are in nats²/parameter-unit², MAS in output-units²/parameter-unit (both per
sample before :func:`finalize_importance` divides by the sample count).
Functions here are pure and work unchanged on a single sample inside ``torch.func.vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.importance import FISHER_LABELS, MAS_OUTPUTS, METHODS_BY_NAME

GRAD_METHODS = tuple(n for n, m in METHODS_BY_NAME.items() if m.loss is not None)


@dataclass(frozen=True)
class LossSpec:
    """Which per-sample loss and which gradient statistic a method uses (its :class:`~cl_tool.importance.Method`)."""

    method: str
    fisher_labels: str = "empirical"
    mas_output: str = "logits"

    def __post_init__(self) -> None:
        if self.method not in GRAD_METHODS:
            raise UsageError(
                f"Importance method {self.method!r} has no per-sample loss; use one of {', '.join(GRAD_METHODS)}."
            )
        if self.loss == "nll" and self.fisher_labels not in FISHER_LABELS:
            raise UsageError(
                f"Unknown Fisher label mode {self.fisher_labels!r}; use one of {', '.join(FISHER_LABELS)}."
            )
        if self.loss == "output" and self.mas_output not in MAS_OUTPUTS:
            raise UsageError(f"Unknown MAS output {self.mas_output!r}; use one of {', '.join(MAS_OUTPUTS)}.")

    @property
    def loss(self) -> str:
        """``"nll"`` (−log p(y|x); Fisher) or ``"output"`` (‖o(x)‖₂²; MAS)."""
        return METHODS_BY_NAME[self.method].loss

    @property
    def stat(self) -> str:
        """``"sq"`` (Σ g²) for Fisher, ``"abs"`` (Σ |g|) for MAS."""
        return METHODS_BY_NAME[self.method].statistic

    def passes(self, num_classes: int) -> int:
        """Number P of per-sample losses (backward passes) per batch."""
        return num_classes if (self.loss == "nll" and self.fisher_labels == "exact") else 1


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation precision: float32, or float64 if it already is float64."""
    return t if t.dtype == torch.float64 else t.float()


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for values of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_fn(stat: str):
    """The element-wise statistic: ``sq`` → x², ``abs`` → |x|."""
    return torch.square if stat == "sq" else torch.abs


def make_targets(
    logits: torch.Tensor, y: torch.Tensor, spec: LossSpec, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-sample int64 targets for :func:`per_sample_losses` (shape ``(B,)``, on ``logits.device``).

    ``empirical``: the true labels (checked against the number of classes); ``sampled``: one draw
    per sample from softmax(logits) with ``generator`` (drawn on the generator's device, CPU by
    default, so a seeded CPU generator gives the same labels on any device); otherwise zeros.
    """
    batch, num_classes = logits.shape
    if spec.loss == "nll" and spec.fisher_labels == "empirical":
        if not isinstance(y, torch.Tensor):
            raise BadInputError("The empirical Fisher needs the true labels, but a batch came without labels.")
        y = y.to(device=logits.device, dtype=torch.int64).reshape(-1)
        if y.numel() != batch:
            raise IncompatibleError(f"A batch has {batch} inputs but {y.numel()} labels; they must match.")
        if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise IncompatibleError(
                f"Labels must lie in 0..{num_classes - 1} (the model's classes) but a batch has {int(y.min())}..{int(y.max())}."
            )
        return y
    if spec.loss == "nll" and spec.fisher_labels == "sampled":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = torch.softmax(wide(logits.detach()), dim=-1).to(gen_device)
        return torch.multinomial(probs, 1, generator=generator).reshape(-1).to(logits.device)
    return torch.zeros(batch, dtype=torch.int64, device=logits.device)


def per_sample_losses(logits: torch.Tensor, targets: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-sample, per-pass losses ``ℓ`` of shape ``(B, P)`` from float32/64 logits ``(B, K)``."""
    if spec.loss == "nll":
        logp = F.log_softmax(logits, dim=-1)
        if spec.fisher_labels == "exact":
            return -(0.5 * logp.detach()).exp() * logp  # √p(y|x)·(−log p(y|x)), √p constant
        return -logp.gather(-1, targets.reshape(-1, 1))
    out = logits if spec.mas_output == "logits" else torch.softmax(logits, dim=-1)
    return out.square().sum(dim=-1, keepdim=True)


def output_cotangents(logits: torch.Tensor, targets: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """∂ℓₙ⁽ᵖ⁾/∂zₙ for every pass: (P, B, K), from float32/64 logits z (B, K), in closed form.

    Back-propagating row p of this from the logits gives the gradients of Σₙ ℓₙ⁽ᵖ⁾ (the losses
    of :func:`per_sample_losses`; a test checks these against autograd). With p = softmax(z):
    Fisher with one label y: p − e_y. Exact Fisher: the K columns sᵧ = √pᵧ·(eᵧ − p) of S (see
    the module docstring; the sign is irrelevant under a square). MAS on logits: 2z; on the
    softmax σ: 2σ∘(σ − ‖σ‖²).
    """
    z = logits.detach()
    if spec.loss == "nll":
        p = torch.softmax(z, dim=-1)  # (B, K)
        if spec.fisher_labels == "exact":
            eye = torch.eye(z.shape[1], device=z.device, dtype=z.dtype)
            return p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None])  # [y, n, k] = √p_ny (δ_yk − p_nk)
        return p.scatter_add_(1, targets.reshape(-1, 1), torch.full_like(p[:, :1], -1.0))[None]
    if spec.mas_output == "logits":
        return (2 * z)[None]
    sigma = torch.softmax(z, dim=-1)
    return (2 * sigma * (sigma - sigma.square().sum(-1, keepdim=True)))[None]
