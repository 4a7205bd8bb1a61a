"""Weight importances for EWC-style regularisation and pruning (Kutalev & Lapina 2021).

The names of methods and options are defined here without importing torch (the CLI declares its
options from them); the functions are imported from :mod:`cl_tool.importance.api` on first use:
:func:`importance_sums`, :func:`finalize_importance`, :func:`compute_importance` and
:class:`SIAccumulator`. See ``api`` for the definitions of the statistics.
"""

from __future__ import annotations

METHODS = ("fisher", "mas", "signal", "magnitude")  # computed from data (or weights); "si" is collected while training
FISHER_LABELS = ("empirical", "sampled", "exact")
MAS_OUTPUTS = ("logits", "softmax")
BIAS_SCORES = ("post-activation", "pre-activation")  # signal: what a bias's unit sends on (see SignalEngine)
SIGNAL_NORMS = ("sum", "mean")  # signal: total over a sample's positions (the paper) or their mean (see rules)
SIGNAL_STATS = ("l1", "l2")  # signal: Σ|a| (the paper) or √(Σa²) (Wanda's ‖X_j‖₂) of the input reaching a weight
PAPER_SIGNAL = {"signal_norm": "sum", "signal_stat": "l1"}  # what a signal sidecar without these records means
# what the commands compute when not told: the variant that pruned best in README "Pruning by score variant"
DEFAULT_SIGNAL = {"signal_norm": "mean", "signal_stat": "l2"}


def stored_signal_variant(options: dict) -> dict[str, str]:
    """The signal variant a sidecar's options record; a sidecar without the record holds the paper's (sum, l1)."""
    return {k: str(options.get(k, v)) for k, v in PAPER_SIGNAL.items()}


_API = ("importance_sums", "finalize_importance", "compute_importance", "SIAccumulator")
__all__ = [
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
