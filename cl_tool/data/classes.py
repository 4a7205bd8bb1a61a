"""Which output row of the model each dataset label means: class names, not positions.

A dataset's labels are ids 0..k-1 of *its* classes: a ``ClassLabel`` feature (an imagefolder's class
folders are one) names them; plain integer labels have no names. A checkpoint records the name of
each output row (``ModelSpec.class_names``: a list of ``num_classes`` entries, a name or None for a
row no named data has used yet). The rules, in order:

* data without names: a label id is the output row (checked against the number of classes);
* a checkpoint without any names (written before names were recorded, or by ``init``): label id k
  of the data is row k, as before, with a note that positions, not names, were matched;
* otherwise each name present in the data is looked up among the rows' names. A name the model does
  not have is refused (exit 4, naming it), except in training (``assign=True``), where it takes the
  first unnamed row, and with ``grow=True`` (``train-next --grow-head``) a new row when none is left.

No torch here: a map is a numpy int64 array, data id → output row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cl_tool.errors import BadInputError, IncompatibleError


@dataclass
class ClassMap:
    """The result of matching a task's classes to a model's rows."""

    lookup: np.ndarray | None  # data id → output row (None: identity)
    names: list[str | None] | None  # the model's row names after assignment (None: the model keeps none)
    added_rows: int = 0  # rows the model must grow by
    assigned: list[str] = field(default_factory=list)  # names newly given a row
    note: str | None = None


def _show(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def present_ids(labels: Any) -> list[int]:
    """The distinct label ids of a task (sorted)."""
    return [int(v) for v in np.unique(np.asarray(labels, dtype=np.int64))]


def match_classes(
    data_names: list[str] | None,
    present: list[int] | None,
    model_names: list[str | None] | None,
    num_classes: int,
    *,
    what: str,
    assign: bool = False,
    grow: bool = False,
) -> ClassMap:
    """Match the classes of a task (``data_names``, the ids ``present`` in it) to a model's rows.

    ``present`` None: a stream whose labels are not known yet (every named class is matched).
    ``what`` names the data in messages (``$data ./test``). Raises IncompatibleError (exit 4)
    for a name the model does not have (unless ``assign``/``grow`` let training give it a row).
    """
    if data_names is None:  # label ids are rows; training records "k" as the name of each row k it saw unnamed
        if assign and present:
            rows = max(num_classes, max(present) + 1) if grow else num_classes
            names = list(model_names) if model_names is not None else [None] * num_classes
            names += [None] * (rows - len(names))
            for k in present:
                if 0 <= k < rows and names[k] is None:
                    names[k] = str(k)
            return ClassMap(None, names, added_rows=rows - num_classes)
        return ClassMap(None, list(model_names) if model_names is not None else None)
    ids = list(range(len(data_names))) if present is None else [k for k in present if 0 <= k < len(data_names)]
    if model_names is None or all(n is None for n in model_names):
        if not assign:
            note = (
                f"{what}: the checkpoint records no class names, so labels are matched by position "
                f"(class {data_names[0]!r} is output 0, ...); checkpoints written by train-next record them."
            )
            return ClassMap(None, None, note=note)
        rows = max(num_classes, len(data_names)) if grow else num_classes
        names: list[str | None] = [None] * rows
        for k in range(min(len(data_names), rows)):
            names[k] = str(data_names[k])
        return ClassMap(None, names, added_rows=rows - num_classes)
    names = list(model_names)
    row_of = {n: i for i, n in enumerate(names) if n is not None}
    unknown = [str(data_names[k]) for k in ids if str(data_names[k]) not in row_of]
    assigned: list[str] = []
    if unknown:
        if not assign:
            known = [n for n in names if n is not None]
            raise IncompatibleError(
                f"{what} has class{'es' if len(unknown) > 1 else ''} {_show(unknown)}, outside the model's "
                f"{num_classes} classes (by name: {_show(known)}); use a model trained on them (train-next gives new classes a row)."
            )
        free = [i for i, n in enumerate(names) if n is None]
        if len(unknown) > len(free) and not grow:
            raise IncompatibleError(
                f"{what} has {len(unknown)} class{'es' if len(unknown) > 1 else ''} the model does not have "
                f"({_show(unknown)}) and {len(free)} unnamed output row{'s' if len(free) != 1 else ''} left; "
                f"pass $grow_head to add output rows."
            )
        for name in unknown:
            if free:
                row = free.pop(0)
                names[row] = name
            else:
                names.append(name)
                row = len(names) - 1
            row_of[name] = row
            assigned.append(name)
    lookup = np.full(len(data_names), -1, dtype=np.int64)
    for k in ids:
        lookup[k] = row_of[str(data_names[k])]
    identity = np.array_equal(lookup[ids], np.asarray(ids, dtype=np.int64))
    return ClassMap(None if identity else lookup, names, added_rows=len(names) - num_classes, assigned=assigned)


def check_names(value: Any, num_classes: int, where: str) -> list[str | None] | None:
    """A checkpoint's ``class_names`` entry validated: None, or ``num_classes`` unique names / nulls."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != num_classes
        or not all(v is None or isinstance(v, str) for v in value)
    ):
        raise BadInputError(
            f"{where} has malformed class names (expected a list of {num_classes} names or nulls); the file is damaged."
        )
    named = [v for v in value if v is not None]
    if len(set(named)) != len(named):
        raise BadInputError(f"{where} names a class twice; the file is damaged.")
    return list(value)


def class_counts(labels: Any, names: list[str] | None) -> dict[str, int]:
    """{class: samples} of a task (names where the data has them, else ids), in id order."""
    arr = np.asarray(labels, dtype=np.int64)
    if arr.size == 0:
        return {}
    ids, counts = np.unique(arr, return_counts=True)
    return {
        (str(names[i]) if names is not None and 0 <= i < len(names) else str(int(i))): int(c)
        for i, c in zip(ids.tolist(), counts.tolist())
    }
