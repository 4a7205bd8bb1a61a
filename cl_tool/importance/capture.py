"""Forward hooks that record what supported layers saw during one forward pass."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Call:
    """One call of a layer: its (detached) input and its output tensor (attached to the graph).

    The versions let the engine detect an in-place op that later overwrote either tensor (then
    the output no longer is the layer's output in the graph, and the call is redone with copies).
    """

    inp: torch.Tensor
    out: torch.Tensor
    inp_version: int
    out_version: int

    def overwritten(self) -> bool:
        return self.inp._version != self.inp_version or self.out._version != self.out_version


def first_tensor(args, kwargs):
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    value = kwargs.get("input", next(iter(kwargs.values()), None))
    return value if isinstance(value, torch.Tensor) else None


@contextmanager
def record_calls(modules: list[nn.Module], copy: set[nn.Module]):
    """Yield ``{module: [Call | None, ...]}`` filled during the forward passes in the block.

    ``None`` marks a call the rules cannot use (non-tensor input/output). For modules in ``copy``
    the input is copied and the output handed on is a copy, so later in-place ops cannot reach
    the recorded tensors.
    """
    calls: dict[nn.Module, list[Call | None]] = {m: [] for m in modules}

    def hook(module, args, kwargs, output):
        x = first_tensor(args, kwargs)
        if x is None or not isinstance(output, torch.Tensor):
            calls[module].append(None)
            return None
        x = x.detach()
        replacement = None
        if module in copy:
            x, replacement = x.clone(), output.clone()
        calls[module].append(Call(x, output, x._version, output._version))
        return replacement

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
