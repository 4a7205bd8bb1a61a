"""Continual-learning summaries of an accuracy matrix (pure Python; no torch).

``R[i][j]`` is the accuracy of the checkpoint saved after stage ``i`` (``i = 0 .. k-1``)
on the test set of task ``j`` (``j = 0 .. m-1``). When ``k == m``, stage ``i`` trained on
task ``i`` and the diagonal ``R[j][j]`` is the accuracy on a task right after learning it.
Accuracies may be fractions or percentages; every summary is in the same unit.

Definitions (indices start at 0; ``mean`` is the arithmetic mean):

* Average accuracy after the last stage: ``ACC = mean_{j=0..m-1} R[k-1][j]``.
* Backward transfer (Lopez-Paz & Ranzato 2017, GEM), only when ``k == m >= 2``:
  ``BWT = 1/(m-1) * sum_{j=0..m-2} (R[m-1][j] - R[j][j])``; negative means forgetting.
  ``None`` otherwise.
* Forgetting of task ``j`` (Chaudhry et al. 2018, RWalk):
  ``f_j = max_{l=0..k-2} R[l][j] - R[k-1][j]``, the drop from the best accuracy of any
  earlier checkpoint to the final one. When ``k == m`` it is defined for the tasks seen
  before the last stage, ``j = 0 .. k-2``, and ``None`` for the last task. When
  ``k != m`` (no stage-to-task correspondence) it is computed for every task
  ``j = 0 .. m-1`` over all earlier stages. With a single stage (``k == 1``) every
  ``f_j`` is ``None``. The maximum runs over all earlier stages, as in RWalk's formula,
  including stages before task ``j`` was trained (those rarely attain it).
* Average forgetting: mean of the defined ``f_j``; ``None`` if there is none.
* Learning accuracy: ``LA = mean_{j=0..m-1} R[j][j]``, only when ``k == m``
  (``None`` otherwise).

BWT, forgetting and LA compare stages, so they are only defined for a sequence (each checkpoint
descends from the previous one); ``cl_summary(R, sequence=False)`` leaves them ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cl_tool.errors import BadInputError


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def _validate(R: Sequence[Sequence[float]]) -> list[list[float]]:
    if not R or not R[0]:
        raise BadInputError("The accuracy matrix is empty; evaluate at least one checkpoint on at least one task.")
    m = len(R[0])
    rows = []
    for i, row in enumerate(R):
        if len(row) != m:
            raise BadInputError(
                f"Row {i} of the accuracy matrix has {len(row)} entries but row 0 has {m}; every checkpoint must be evaluated on the same tasks."
            )
        out = []
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise BadInputError(f"Accuracy R[{i}][{j}] is {x!r}, not a finite number.")
            out.append(float(x))
        rows.append(out)
    return rows


def cl_summary(R: Sequence[Sequence[float]], *, sequence: bool = True) -> dict:
    """Summaries of the ``k x m`` accuracy matrix ``R`` (see the module docstring).

    ``sequence``: the checkpoints are stages of one run (each descends from the previous one); when False,
    only ``average_accuracy`` is computed (the rows are not stages, so nothing compares them).

    Returns a dict with keys ``num_stages`` (k), ``num_tasks`` (m),
    ``average_accuracy`` (ACC), ``bwt`` (BWT or None), ``forgetting`` (list of m entries,
    ``f_j`` or None), ``average_forgetting`` (or None) and ``learning_accuracy`` (LA or
    None). Raises :class:`BadInputError` for an empty, ragged or non-finite matrix.
    """
    R = _validate(R)
    k, m = len(R), len(R[0])
    square = k == m and sequence
    acc = _mean(R[k - 1])
    bwt = None
    if square and m >= 2:
        bwt = math.fsum(R[m - 1][j] - R[j][j] for j in range(m - 1)) / (m - 1)
    forgetting: list[float | None] = [None] * m
    if k >= 2 and sequence:
        for j in range(m - 1 if square else m):
            forgetting[j] = max(R[l][j] for l in range(k - 1)) - R[k - 1][j]
    defined = [f for f in forgetting if f is not None]
    return {
        "num_stages": k,
        "num_tasks": m,
        "average_accuracy": acc,
        "bwt": bwt,
        "forgetting": forgetting,
        "average_forgetting": _mean(defined) if defined else None,
        "learning_accuracy": _mean([R[j][j] for j in range(m)]) if square else None,
    }


def gate_verdicts(
    summary: dict, fail_under_acc: float | None = None, fail_over_forgetting: float | None = None
) -> list[dict]:
    """One record per given gate: ``{"gate", "value", "limit", "passed"}`` (see :func:`gate` for when each fails).

    ``gate`` is the option's parameter name (``fail_under_acc``, ``fail_over_forgetting``); ``value`` the summary it
    tests (``None`` when undefined: the gate then passes).
    """
    verdicts = []
    acc = summary.get("average_accuracy")
    if fail_under_acc is not None:
        passed = acc is None or acc >= fail_under_acc
        verdicts.append({"gate": "fail_under_acc", "value": acc, "limit": fail_under_acc, "passed": passed})
    fgt = summary.get("average_forgetting")
    if fail_over_forgetting is not None:
        passed = fgt is None or fgt <= fail_over_forgetting
        verdicts.append({"gate": "fail_over_forgetting", "value": fgt, "limit": fail_over_forgetting, "passed": passed})
    return verdicts


def gate(summary: dict, fail_under_acc: float | None = None, fail_over_forgetting: float | None = None) -> str | None:
    """A one-line reason to fail, or None when every given threshold is met.

    Fails when ``average_accuracy < fail_under_acc`` or when
    ``average_forgetting > fail_over_forgetting`` (both reasons joined with ``"; "``).
    An undefined average forgetting (a single stage) does not fail the forgetting gate.
    Thresholds are in the unit of the matrix (fraction or percent).
    """
    reasons = []
    acc = summary.get("average_accuracy")
    if fail_under_acc is not None and acc is not None and acc < fail_under_acc:
        reasons.append(f"average accuracy {acc:.6g} is below $fail_under_acc {fail_under_acc:g}")
    fgt = summary.get("average_forgetting")
    if fail_over_forgetting is not None and fgt is not None and fgt > fail_over_forgetting:
        reasons.append(f"average forgetting {fgt:.6g} is above $fail_over_forgetting {fail_over_forgetting:g}")
    return "; ".join(reasons) + "." if reasons else None
