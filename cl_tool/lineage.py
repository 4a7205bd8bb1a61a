"""Lineage: which checkpoints a checkpoint descends from, read from its history.

Every command that writes a checkpoint appends one entry to its ``cl_tool.history`` (oldest
first), and the entries of the commands that read a checkpoint record that input's fingerprint:
``train-next`` as ``anchor_fingerprint``, ``prune`` as ``source_fingerprint``; ``init`` (and the
``import`` of a timm folder) has no input. So the input of the k-th newest entry is the checkpoint
k generations back; generation 0 is the checkpoint itself, whose own fingerprint is computed from
its tensors, never read from its history.

An importance sidecar records the fingerprint of the checkpoint it was computed for. ``prune`` and
``train-next`` accept a sidecar of the checkpoint itself or of one of its recorded ancestors (Ω of
an ancestor is the usual shortcut when importance is not recomputed after each task), and refuse
any other with exit 4.

History is metadata anyone can edit: lineage prevents mistakes (the sidecar of a sibling branch
or of an unrelated model), it is not a signature. No torch import here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cl_tool.errors import IncompatibleError

INPUT_KEYS = ("anchor_fingerprint", "source_fingerprint")  # train-next, prune


@dataclass(frozen=True)
class Ancestor:
    """The checkpoint ``generations`` steps back, as the history entry that read it records it."""

    generations: int
    fingerprint: str | None  # None: the entry records no input (init, import, or an edited history)
    command: str  # the command that made the next generation from it
    time: str | None = None
    grown: tuple[str, ...] = ()  # tensors that command gave new rows (train-next --grow-head)


def _entry_input(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    for key in INPUT_KEYS:
        fp = entry.get(key)
        if isinstance(fp, str) and fp:
            return fp
    return None


def ancestors(history: Iterable[Any]) -> list[Ancestor]:
    """The recorded ancestors, newest (1 generation back) first; one per history entry."""
    out = []
    for k, entry in enumerate(reversed(list(history or [])), start=1):
        e = entry if isinstance(entry, dict) else {}
        grown = e.get("grown")
        out.append(
            Ancestor(
                generations=k,
                fingerprint=_entry_input(e),
                command=str(e.get("command", "?")),
                time=e.get("time") if isinstance(e.get("time"), str) else None,
                grown=tuple(g for g in grown if isinstance(g, str)) if isinstance(grown, list) else (),
            )
        )
    return out


def ancestor_fingerprints(history: Iterable[Any]) -> list[tuple[int, str]]:
    """(generations back, fingerprint) of every recorded ancestor, newest first."""
    return [(a.generations, a.fingerprint) for a in ancestors(history) if a.fingerprint]


def generations_back(fingerprint: str, own_fingerprint: str, history: Iterable[Any]) -> int | None:
    """0 if ``fingerprint`` is the checkpoint's own, N if it is its ancestor N generations back, None otherwise."""
    if fingerprint == own_fingerprint:
        return 0
    for gen, fp in ancestor_fingerprints(history):
        if fp == fingerprint:
            return gen
    return None


def sequence_break(checkpoints: list[tuple[str | None, list[Any]]]) -> int | None:
    """The first index ``i >= 1`` whose checkpoint does not descend from checkpoint ``i - 1``, or None (a sequence).

    ``checkpoints``: (own fingerprint, history) of each, in stage order. Descending means the previous one's
    fingerprint is a recorded ancestor, any number of generations back (a prune between stages is fine).
    """
    for i in range(1, len(checkpoints)):
        previous = checkpoints[i - 1][0]
        if previous is None or previous not in {fp for _, fp in ancestor_fingerprints(checkpoints[i][1])}:
            return i
    return None


def grown_since(history: Iterable[Any], generations: int) -> frozenset[str]:
    """Tensors that got new output rows in the last ``generations`` steps (their new rows have no stored score)."""
    return frozenset(name for a in ancestors(history)[:generations] for name in a.grown)


def kinship(fingerprint: str, own_fingerprint: str, history: Iterable[Any]) -> tuple[int | None, frozenset[str]]:
    """(generations back, tensors grown since) of the checkpoint ``fingerprint`` seen from the checkpoint with
    ``own_fingerprint`` and ``history`` (see :func:`generations_back`); (None, ∅) if it is not a recorded ancestor."""
    gen = generations_back(fingerprint, own_fingerprint, history)
    return gen, (grown_since(history, gen) if gen else frozenset())


def rows_fit(stored: Iterable[int], wanted: Iterable[int], grown: bool) -> bool:
    """Whether scores of shape ``stored`` fit a tensor of shape ``wanted``: the same shape, or, for a tensor that
    ``--grow-head`` gave new output rows since (``grown``), fewer rows along dim 0 and the same otherwise (the new
    rows score 0)."""
    stored, wanted = tuple(int(s) for s in stored), tuple(int(s) for s in wanted)
    return stored == wanted or (
        grown and len(stored) == len(wanted) >= 1 and stored[1:] == wanted[1:] and stored[0] < wanted[0]
    )


def fit_problem(
    stored: dict[str, Iterable[int]], wanted: dict[str, Iterable[int]], grown: Iterable[str]
) -> tuple[str, list[int], list[int]] | None:
    """The first name of ``wanted`` whose stored scores do not fit it (:func:`rows_fit`), as (name, stored shape,
    wanted shape); None if all fit. A name ``stored`` lacks is left to the caller's name check."""
    grown = set(grown)
    for name, want in wanted.items():
        if name in stored and not rows_fit(stored[name], want, name in grown):
            return name, [int(s) for s in stored[name]], [int(s) for s in want]
    return None


def not_related_text(checkpoint_path: str, fingerprint: str, n_ancestors: int) -> str:
    """``which is neither CKPT (fingerprint F) nor one of its N recorded ancestors`` (for the refusal sentences)."""
    if n_ancestors == 0:
        return f"which is not {checkpoint_path} (fingerprint {fingerprint}), and {checkpoint_path} records no ancestors"
    return (
        f"which is neither {checkpoint_path} (fingerprint {fingerprint}) nor one of its {n_ancestors} recorded "
        f"ancestor{'s' if n_ancestors != 1 else ''}"
    )


def unrelated_text(target: dict[str, Any]) -> str:
    """:func:`not_related_text` of an ``info --for`` target (see ``checkpoint.lineage_target``)."""
    return not_related_text(target["path"], target["fingerprint"], len(ancestor_fingerprints(target["history"])))


def target_note(target: dict[str, Any]) -> str:
    """The end of an ``info --for`` verdict: which fingerprint of the target it was judged by."""
    if target["fingerprint_from"] == "computed":
        return ""
    return f"; judged by the fingerprint {target['path']} records (--verify recomputes it)"


def fit_text(
    names: Iterable[str], stored: dict[str, list[int]], target: dict[str, Any], grown: Iterable[str], *, every: bool
) -> str | None:
    """Why tensors of the shapes ``stored`` (scores or masks) do not fit the ``info --for`` target, or None: each of
    ``names`` must be a tensor of the target whose shape the stored one fits (:func:`rows_fit`); ``every``: each
    name must also have a stored entry (a sidecar's rule)."""
    ck, names, grown = target["path"], list(names), set(grown)
    missing = [n for n in names if n not in stored] if every else []
    if missing:
        return f"it has no entry for {missing[0]!r} of {ck}"
    for n in names:
        if n not in target["shapes"]:
            return f"{ck} has no parameter {n!r}"
        want, got = target["shapes"][n], stored.get(n)
        if got is not None and not rows_fit(got, want, n in grown):
            return f"{n!r} has shape {got} there but {want} in {ck}"
    return None


def generations_text(n: int) -> str:
    return f"{n} generation{'s' if n != 1 else ''} back"


@dataclass(frozen=True)
class SidecarUse:
    """A sidecar accepted for a checkpoint: whose scores they are and how far back."""

    path: str
    fingerprint: str
    generations: int
    checkpoint: str  # the checkpoint it is used for
    owner: str | None = None  # the checkpoint path the sidecar records it was computed for
    grown: frozenset[str] = field(default_factory=frozenset)

    @property
    def note(self) -> str | None:
        """One line for the log when the scores are an ancestor's (None for the checkpoint's own)."""
        if self.generations == 0:
            return None
        whose = f"{self.owner} (fingerprint {self.fingerprint})" if self.owner else f"fingerprint {self.fingerprint}"
        return (
            f"Using the importances in {self.path}, computed for {whose}, an ancestor of {self.checkpoint} "
            f"{generations_text(self.generations)} per its history."
        )

    def record(self) -> dict[str, Any]:
        return {"sidecar": self.path, "sidecar_fingerprint": self.fingerprint, "generations": self.generations}


def sidecar_owner(sc) -> str | None:
    """The checkpoint path the sidecar's newest task record names (as it was given on the command line)."""
    tasks = getattr(sc, "tasks", None) or []
    last = tasks[-1] if tasks and isinstance(tasks[-1], dict) else {}
    owner = last.get("checkpoint")
    return owner if isinstance(owner, str) and last.get("fingerprint") == sc.fingerprint else None


def check_sidecar(sc, ckpt, checkpoint_path: str, *, fingerprint: str | None = None) -> SidecarUse:
    """Accept ``sc`` for ``ckpt`` if it belongs to it or to a recorded ancestor; else raise IncompatibleError (exit 4).

    ``fingerprint``: the checkpoint's own fingerprint if already known (default: computed from its tensors).
    """
    own = fingerprint or ckpt.fingerprint
    gen, grown = kinship(sc.fingerprint, own, ckpt.history)
    if gen is None:
        n = len(ancestor_fingerprints(ckpt.history))
        owner = sidecar_owner(sc)
        raise IncompatibleError(
            f"Importance file {sc.path} belongs to another checkpoint ({f'{owner}, ' if owner else ''}fingerprint {sc.fingerprint}), "
            f"{not_related_text(checkpoint_path, own, n)}; "
            f"recompute it with `cl-tool importance {checkpoint_path}` or use the sidecar of a checkpoint it descends from."
        )
    return SidecarUse(
        path=str(sc.path),
        fingerprint=sc.fingerprint,
        generations=gen,
        checkpoint=checkpoint_path,
        owner=sidecar_owner(sc),
        grown=grown,
    )


def fit_rows(tensors: dict[str, Any], params: dict[str, Any], grown: Iterable[str]) -> dict[str, Any]:
    """Scores for each name in ``params`` (None where the sidecar has none); the rows a grown head gained score 0.

    Only tensors listed in ``grown`` are padded, and only along dim 0; other shape differences are left
    for the caller's shape check.
    """
    grown = set(grown)
    out: dict[str, Any] = {}
    for name, p in params.items():
        om = tensors.get(name)
        shape = tuple(p.shape)
        if om is not None and tuple(om.shape) != shape and rows_fit(om.shape, shape, name in grown):
            pad = om.new_zeros(shape)
            pad[: om.shape[0]] = om
            om = pad
        out[name] = om
    return out


# ----------------------------------------------------------------- the history as `cl-tool info` shows it

CELL_CHARS = 80  # a longer text of a history entry is cut to this


def _clip(text: Any) -> Any:
    return text[: CELL_CHARS - 1] + "…" if isinstance(text, str) and len(text) > CELL_CHARS else text


def _omega_text(e: dict[str, Any]) -> str | None:
    if not e.get("importance"):
        return None
    gen = e.get("importance_generations")
    return f"Ω {e['importance']}" + (f" ({gen} back)" if isinstance(gen, int) and gen > 0 else "")


def _detail(cmd: str, e: dict[str, Any]) -> str | None:
    """What the history table's detail column says of an entry of ``cmd``."""
    if cmd == "train-next":
        bits = [
            _omega_text(e),
            f"grew {', '.join(map(str, e['grown']))}" if isinstance(e.get("grown"), list) else None,
            f"mask {e['mask']}" if e.get("mask") else None,
        ]
        return "; ".join(b for b in bits if b)
    if cmd == "prune":
        achieved = e.get("achieved", e.get("sparsity"))
        bits = [
            f"{e.get('by')} {achieved:.1%}" if isinstance(achieved, (int, float)) else f"{e.get('by')}",
            _omega_text(e),
        ]
        return "; ".join(b for b in bits if b)
    if cmd == "import":
        return f"from {e.get('from')}"
    return None


def history_rows(history: list[Any]) -> list[dict[str, Any]]:
    """The history as short records: command, data, penalty, λ, a detail, time (texts cut to CELL_CHARS)."""
    rows = []
    for e in history:
        e = e if isinstance(e, dict) else {}
        cmd = str(e.get("command", "?"))
        data = e.get("data")
        data_text = (
            (data.get("name") or data.get("source")) if isinstance(data, dict) else (str(data) if data else None)
        )
        rows.append(
            {
                "command": _clip(cmd),
                "data": _clip(data_text),
                "penalty": _clip(e.get("penalty")),
                "lambda": _clip(e.get("lambda")),
                "detail": _clip(_detail(cmd, e)) or None,
                "time": _clip(e.get("time")),
                "entry": e,  # the entry as stored (split, epochs, lr, command line, ...)
            }
        )
    return rows


def describe_history(history: list[Any], *, entries: int, generations: int) -> dict[str, Any]:
    """The newest ``entries`` history entries as rows, the newest ``generations`` ancestors, and how many entries
    exist (and were dropped before the oldest kept)."""
    first = history[0] if history and isinstance(history[0], dict) else {}
    dropped = first.get("dropped_before")
    return {
        "history_entries": len(history),
        "history_dropped": dropped if isinstance(dropped, int) and not isinstance(dropped, bool) else 0,
        "history": history_rows(history[-entries:]),
        "lineage": [
            {
                "generations": anc.generations,
                "fingerprint": _clip(anc.fingerprint),
                "read_by": _clip(anc.command),
                "time": _clip(anc.time),
            }
            for anc in ancestors(history[-generations:])
        ],
    }
