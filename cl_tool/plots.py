"""PNG plots of continual-learning results (matplotlib is optional: ``cl-tool[plot]``).

matplotlib is imported inside the functions and rendered with the Agg canvas directly
(no pyplot, no global backend switch). Each plot is rendered into memory and written
atomically with :func:`cl_tool.atomic.write_bytes_atomic`, so a reader sees either no
file or the complete PNG. An existing file is only replaced with ``force=True``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

from cl_tool.atomic import check_output, write_bytes_atomic
from cl_tool.errors import EnvironmentProblem


def require_matplotlib() -> None:
    """EnvironmentProblem (exit 7) when matplotlib is not installed: a command checks this before its long work."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise EnvironmentProblem("$plot needs matplotlib: pip install 'cl-tool[plot]'.") from exc


def _figure(figsize):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, force: bool) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    write_bytes_atomic(path, buf.getvalue(), force=force)


def _scale(values: Sequence[float]) -> tuple[float, str]:
    """Upper end of the color scale and the annotation format: fractions or percent."""
    top = max(values, default=1.0)
    if top <= 1.0:
        return 1.0, "{:.3f}"
    if top <= 100.0:
        return 100.0, "{:.1f}"
    return top, "{:.3g}"


def plot_accuracy_matrix(
    R: Sequence[Sequence[float]],
    stage_names: Sequence[str],
    task_names: Sequence[str],
    path: str | os.PathLike,
    *,
    force: bool = False,
    title: str | None = None,
    option: str = "$plot",
) -> None:
    """Write a PNG: left, a heat map of ``R[stage][task]`` with each value printed;
    right, each task's accuracy across stages (one line per task).

    The color scale is 0..1 for fractions, 0..100 for percentages. ``stage_names`` and
    ``task_names`` label the rows and columns (lengths must match ``R``). Raises
    :class:`~cl_tool.errors.OutputError` if ``path`` exists and ``force`` is false
    (``option`` names the flag in that message) and
    :class:`~cl_tool.errors.EnvironmentProblem` if matplotlib is missing.
    """
    k = len(R)
    m = len(R[0]) if k else 0
    if k == 0 or m == 0 or any(len(row) != m for row in R):
        raise ValueError("R must be a non-empty rectangular matrix")
    if len(stage_names) != k or len(task_names) != m:
        raise ValueError(f"need {k} stage names and {m} task names, got {len(stage_names)} and {len(task_names)}")
    check_output(path, force=force, role=option)
    values = [float(x) for row in R for x in row]
    vmax, fmt = _scale([v for v in values if math.isfinite(v)])

    fig = _figure((max(9.0, 4.0 + 1.2 * (m + k)), max(4.0, 1.5 + 0.5 * k)))
    ax_h, ax_l = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(m, 2), max(k, 3)]})
    im = ax_h.imshow(R, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
    ax_h.set_xticks(
        range(m), [str(t) for t in task_names], rotation=45 if m > 4 else 0, ha="right" if m > 4 else "center"
    )
    ax_h.set_yticks(range(k), [str(s) for s in stage_names])
    ax_h.set_xlabel("evaluated on task")
    ax_h.set_ylabel("checkpoint after stage")
    for i in range(k):
        for j in range(m):
            v = float(R[i][j])
            light = math.isfinite(v) and v / vmax > 0.6
            ax_h.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color="black" if light else "white")
    fig.colorbar(im, ax=ax_h, fraction=0.046, pad=0.04, label="accuracy")

    xs = list(range(k))
    for j in range(m):
        ax_l.plot(xs, [float(R[i][j]) for i in range(k)], marker="o", label=str(task_names[j]))
    ax_l.set_xticks(xs, [str(s) for s in stage_names], rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax_l.set_xlabel("checkpoint after stage")
    ax_l.set_ylabel("accuracy")
    ax_l.set_ylim(0.0, vmax * 1.02)
    ax_l.grid(True, alpha=0.3)
    ax_l.legend(title="task", fontsize=8, loc="best")
    fig.suptitle(title or "Accuracy per stage and task")
    fig.tight_layout()
    _save(fig, path, force)


def plot_prune_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str = "Accuracy vs sparsity",
    *,
    force: bool = False,
    option: str = "$plot",
) -> None:
    """Write a PNG of accuracy (y) against sparsity (x), one line per score type.

    ``curves`` maps a label (e.g. ``"ewc"``, ``"magnitude"``) to ``(sparsity,
    accuracy)`` points; points are sorted by sparsity. Sparsity is drawn in percent when
    given as a fraction (all values <= 1). Same errors as :func:`plot_accuracy_matrix`.
    """
    if not curves:
        raise ValueError("curves is empty")
    check_output(path, force=force, role=option)
    all_x = [float(x) for pts in curves.values() for x, _ in pts]
    all_y = [float(y) for pts in curves.values() for _, y in pts]
    x_mul = 100.0 if all_x and max(all_x) <= 1.0 else 1.0
    ymax, _ = _scale([y for y in all_y if math.isfinite(y)])

    fig = _figure((7.0, 4.5))
    ax = fig.subplots()
    for label, pts in curves.items():
        pts = sorted((float(x), float(y)) for x, y in pts)
        ax.plot([x * x_mul for x, _ in pts], [y for _, y in pts], marker="o", label=str(label))
    ax.set_xlabel("sparsity (%)" if x_mul == 100.0 else "sparsity")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, ymax * 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(title="scores", loc="best")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path, force)


def plot_lambda_sweep(
    lambdas: Sequence[float],
    accuracy: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    title: str = "Accuracy vs λ",
    *,
    force: bool = False,
    option: str = "$plot",
) -> None:
    """Write a PNG of accuracy (y) against the penalty strength λ (x, logarithmic), one line per task and their mean.

    ``accuracy`` maps a task name to its accuracy at each of ``lambdas`` (None: not measured, drawn as a gap);
    the mean over the tasks is drawn as a thick black line (at a λ where a task is missing, the mean of the
    others). When 0 is among ``lambdas`` the axis is symmetric-logarithmic: linear between 0 and the smallest
    positive λ, logarithmic above. Same errors as :func:`plot_accuracy_matrix`.
    """
    if not lambdas or not accuracy or any(len(v) != len(lambdas) for v in accuracy.values()):
        raise ValueError("need one accuracy per λ for every task")
    check_output(path, force=force, role=option)
    order = sorted(range(len(lambdas)), key=lambda i: float(lambdas[i]))
    xs = [float(lambdas[i]) for i in order]
    curves = {
        str(name): [math.nan if accs[i] is None else float(accs[i]) for i in order] for name, accs in accuracy.items()
    }
    mean = []
    for j in range(len(xs)):
        known = [c[j] for c in curves.values() if math.isfinite(c[j])]
        mean.append(sum(known) / len(known) if known else math.nan)
    ymax, _ = _scale([y for c in curves.values() for y in c if math.isfinite(y)])

    fig = _figure((7.0, 4.5))
    ax = fig.subplots()
    for name, ys in curves.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.plot(xs, mean, marker="s", color="black", linewidth=2.5, label="mean")
    positive = [x for x in xs if x > 0]
    if len(positive) < len(xs):
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
    else:
        ax.set_xscale("log")
    ax.set_xlabel("λ (penalty strength)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, ymax * 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="eval task", loc="best")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path, force)
