"""Weight importances for EWC-style regularisation and pruning (Kutalev & Lapina 2021).

The names of methods and options are defined here without importing torch (the CLI declares its
options from them); the functions are imported from :mod:`cl_tool.importance.api` on first use:
:func:`importance_sums`, :func:`finalize_importance`, :func:`compute_importance` and
:class:`SIAccumulator`. See ``api`` for the definitions of the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FISHER_LABELS = ("empirical", "sampled", "exact")
MAS_OUTPUTS = ("logits", "softmax")
BIAS_SCORES = ("post-activation", "pre-activation")  # signal: what a bias's unit sends on (see SignalEngine)
SIGNAL_NORMS = ("sum", "mean")  # signal: total over a sample's positions (the paper) or their mean (see rules)
SIGNAL_STATS = ("l1", "l2")  # signal: Σ|a| (the paper) or √(Σa²) (Wanda's ‖X_j‖₂) of the input reaching a weight
PAPER_SIGNAL = {"signal_norm": "sum", "signal_stat": "l1"}  # what a signal sidecar without these records means
# what the commands compute when not told: the variant that pruned best in README "Pruning by score variant"
DEFAULT_SIGNAL = {"signal_norm": "mean", "signal_stat": "l2"}


@dataclass(frozen=True)
class Method:
    """One importance method (formulas: ``api``). ``source``: "data", "weights" or "training" (train-next $si_out).
    ``loss``: the per-sample loss of ``losses`` — "nll" (−log p(y|x)), "output" (‖o(x)‖₂²) or None (no gradient).
    ``statistic``: what is summed over samples — "sq" (g²), "abs" (|g|), "signal", "abs_w" (|w|) or "path" (SI).
    ``reduce``: "mean" (sums / N) or "sum". ``weighs_w``: the scores already weigh |w| (``prune --rank auto`` ranks
    them as stored), else an importance Ω ranked by Ω·w². ``options``: those that apply, with the commands' defaults,
    in the order a sidecar records them."""

    name: str
    source: str
    loss: str | None
    statistic: str
    reduce: str
    weighs_w: bool
    options: dict[str, str] = field(default_factory=dict)

    @property
    def needs_data(self) -> bool:
        return self.source == "data"


METHODS_BY_NAME = {
    m.name: m
    for m in (
        Method("fisher", "data", "nll", "sq", "mean", False, {"fisher_labels": "empirical"}),
        Method("mas", "data", "output", "abs", "mean", False, {"mas_output": "logits"}),
        Method("signal", "data", None, "signal", "sum", True, {"bias_score": "post-activation", **DEFAULT_SIGNAL}),
        Method("magnitude", "weights", None, "abs_w", "sum", True),
        Method("si", "training", None, "path", "sum", False),
    )
}
METHODS = tuple(n for n, m in METHODS_BY_NAME.items() if m.source != "training")  # computed from data or weights


def stored_signal_variant(options: dict) -> dict[str, str]:
    """The signal variant a sidecar's options record; a sidecar without the record holds the paper's (sum, l1)."""
    return {k: str(options.get(k, v)) for k, v in PAPER_SIGNAL.items()}


_API = ("importance_sums", "finalize_importance", "compute_importance", "SIAccumulator")
__all__ = [
    "Method",
    "METHODS_BY_NAME",
    "METHODS",
    "FISHER_LABELS",
    "MAS_OUTPUTS",
    "BIAS_SCORES",
    "SIGNAL_NORMS",
    "SIGNAL_STATS",
    "PAPER_SIGNAL",
    "DEFAULT_SIGNAL",
    "stored_signal_variant",
    *_API,
]


def __getattr__(name: str):
    if name in _API:
        from cl_tool.importance import api

        return getattr(api, name)
    raise AttributeError(f"module 'cl_tool.importance' has no attribute {name!r}")
