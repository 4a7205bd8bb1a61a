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


def sidecar_relation(sidecar_fp: str, ckpt) -> int | None:
    """How many generations back the checkpoint a sidecar was computed for lies from ``ckpt`` (None: not related)."""
    return generations_back(sidecar_fp, ckpt.fingerprint, ckpt.history)


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


def not_related_text(checkpoint_path: str, fingerprint: str, n_ancestors: int) -> str:
    """``which is neither CKPT (fingerprint F) nor one of its N recorded ancestors`` (for the refusal sentences)."""
    if n_ancestors == 0:
        return f"which is not {checkpoint_path} (fingerprint {fingerprint}), and {checkpoint_path} records no ancestors"
    return (
        f"which is neither {checkpoint_path} (fingerprint {fingerprint}) nor one of its {n_ancestors} recorded "
        f"ancestor{'s' if n_ancestors != 1 else ''}"
    )


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
    gen = generations_back(sc.fingerprint, own, ckpt.history)
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
        grown=grown_since(ckpt.history, gen),
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
        if (
            name in grown
            and om is not None
            and len(om.shape) == len(shape) >= 1
            and tuple(om.shape[1:]) == shape[1:]
            and om.shape[0] < shape[0]
        ):
            pad = om.new_zeros(shape)
            pad[: om.shape[0]] = om
            om = pad
        out[name] = om
    return out
