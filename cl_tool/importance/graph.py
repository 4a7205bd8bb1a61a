"""Autograd-graph inspection: who consumes each parameter, and "additive taps".

``GraphIndex`` walks the graph of one forward pass once and answers, for a parameter, the list
of graph nodes that use it (looking through the dtype casts autocast inserts). The engine uses
it to check that a layer rule sees *every* use of its parameters (the number of uses must equal
the number of recorded calls of the layer, otherwise the weight is also used elsewhere, e.g.
tied, and goes to the exact fallback).

An *additive tap* handles a parameter whose single use is a broadcasting ``add``/``sub`` or an
``expand`` over the batch axis (ViT ``pos_embed`` and ``cls_token``): with G the gradient of the
summed loss w.r.t. that op's output (B, …), the per-sample gradient is
∂ℓₙ/∂θ = α·Σ_{broadcast axes} Gₙ (α: the op's scale, ±1 by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cl_tool.importance.losses import wide

_CASTS = {"ToCopyBackward0"}
_ADDITIVE = {"AddBackward0", "SubBackward0", "ExpandBackward0"}


class GraphIndex:
    """Parents of every node reachable from ``root`` (a ``grad_fn``)."""

    def __init__(self, root) -> None:
        self.parents: dict = {}
        self.accumulators: dict[int, object] = {}
        stack, seen = [root], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "AccumulateGrad":
                self.accumulators[id(node.variable)] = node
            for i, (nxt, _) in enumerate(node.next_functions):
                if nxt is not None:
                    self.parents.setdefault(nxt, []).append((node, i))
                    stack.append(nxt)

    def consumers(self, param: torch.Tensor) -> list[tuple[object, int]]:
        """(node, input position) pairs that use ``param``; empty if it is not in the graph."""
        acc = self.accumulators.get(id(param))
        return [] if acc is None else self._through_casts(acc)

    def _through_casts(self, node) -> list[tuple[object, int]]:
        out = []
        for parent, i in self.parents.get(node, []):
            out.extend(self._through_casts(parent) if type(parent).__name__ in _CASTS else [(parent, i)])
        return out


def without_hooked_ancestors(items: list, node_of=lambda t: t.grad_fn) -> list:
    """The items (tensors, or anything ``node_of`` maps to its graph node) none of whose forward
    ancestors is the node of another item ("sources").

    Asking autograd for the gradients of just the sources runs the backward pass through every
    other item's node too (each depends on a source), so their hooks fire while only the
    sources' gradients are returned and held.
    """
    hooked = {node_of(t) for t in items if node_of(t) is not None}
    below: dict = {}  # node -> a hooked node is reachable through next_functions
    for root in hooked:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in below:
                continue
            children = [nxt for nxt, _ in node.next_functions if nxt is not None]
            if expanded:
                below[node] = any(c in hooked or below[c] for c in children)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in below)
    return [t for t in items if node_of(t) is None or not below[node_of(t)]]


def reduce_per_sample(grad: torch.Tensor, shape: torch.Size, batch: int) -> torch.Tensor | None:
    """Per-sample gradient (B, *shape) of a parameter broadcast into ``grad``'s shape (B, …).

    Sums the axes along which the parameter was broadcast; None if the parameter was not
    broadcast over the batch axis 0 or the shapes do not line up.
    """
    if grad.dim() < len(shape) or grad.shape[0] != batch:
        return None
    padded = (1,) * (grad.dim() - len(shape)) + tuple(shape)
    if padded[0] != 1:
        return None
    axes = []
    for d in range(1, grad.dim()):
        if padded[d] != grad.shape[d]:
            if padded[d] != 1:
                return None
            axes.append(d)
    out = wide(grad).sum(axes, keepdim=True) if axes else wide(grad)
    return out.reshape(batch, *shape)


@dataclass
class AdditiveTap:
    """A prehook on the single node that uses a parameter additively; collects G per pass."""

    node: object
    scale: float
    grads: list = field(default_factory=list)
    handle: object = None

    @classmethod
    def find(cls, consumers: list[tuple[object, int]]) -> AdditiveTap | None:
        if len(consumers) != 1:
            return None
        node, position = consumers[0]
        kind = type(node).__name__
        if kind not in _ADDITIVE:
            return None
        scale = 1.0
        if kind != "ExpandBackward0" and position == 1:
            alpha = getattr(node, "_saved_alpha", 1)
            scale = float(alpha) * (-1.0 if kind == "SubBackward0" else 1.0)
        return cls(node, scale)

    def attach(self) -> None:
        self.handle = self.node.register_prehook(self._hook)

    def _hook(self, grad_outputs):
        self.grads.append(grad_outputs[0])

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def take(self, shape: torch.Size, batch: int) -> torch.Tensor | None:
        """The per-sample gradient of the last pass, (B, *shape), or None if it cannot be split."""
        if len(self.grads) != 1 or self.grads[0] is None:
            self.grads.clear()
            return None
        grad = self.grads.pop()
        per_sample = reduce_per_sample(grad, shape, batch)
        return None if per_sample is None else per_sample * self.scale
