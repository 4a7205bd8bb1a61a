"""Forward hooks that record what supported layers saw during one forward pass."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Call:
    """One call of a layer: its (detached) input and its output tensor (attached to the graph).

    ``node``/``nr``: the output's ``grad_fn`` and ``output_nr`` when the layer returned it. The
    versions let the engine detect an in-place op that later overwrote either tensor: an
    overwritten output's gradient is still the one that ``node`` receives as its input ``nr``;
    an overwritten input is lost (the call is then redone with copies).
    """

    inp: torch.Tensor
    out: torch.Tensor
    inp_version: int
    out_version: int
    node: object = None
    nr: int = 0

    def input_overwritten(self) -> bool:
        return self.inp._version != self.inp_version

    def output_overwritten(self) -> bool:
        return self.out._version != self.out_version


def first_tensor(args, kwargs):
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    value = kwargs.get("input", next(iter(kwargs.values()), None))
    return value if isinstance(value, torch.Tensor) else None


@contextmanager
def record_calls(modules: list[nn.Module], copy: set[nn.Module]):
    """Yield ``{module: [Call | None, ...]}`` filled during the forward passes in the block.

    ``None`` marks a call the rules cannot use (non-tensor input/output). For modules in ``copy``
    the recorded input is a copy, so later in-place ops cannot reach it.
    """
    calls: dict[nn.Module, list[Call | None]] = {m: [] for m in modules}

    def hook(module, args, kwargs, output):
        x = first_tensor(args, kwargs)
        if x is None or not isinstance(output, torch.Tensor):
            calls[module].append(None)
            return None
        x = x.detach().clone() if module in copy else x.detach()
        calls[module].append(Call(x, output, x._version, output._version, output.grad_fn, output.output_nr))
        return None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
