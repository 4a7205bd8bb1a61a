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

_API = ("importance_sums", "finalize_importance", "compute_importance", "SIAccumulator")
__all__ = ["METHODS", "FISHER_LABELS", "MAS_OUTPUTS", "BIAS_SCORES", *_API]


def __getattr__(name: str):
    if name in _API:
        from cl_tool.importance import api

        return getattr(api, name)
    raise AttributeError(f"module 'cl_tool.importance' has no attribute {name!r}")
