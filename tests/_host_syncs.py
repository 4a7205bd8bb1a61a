"""Count the calls that make the host wait for the device (a CUDA sync), found on the CPU by a torch function mode.

A call counts when it reads a tensor's value into Python (``item``, ``bool``/``float``/``int``/``index``, ``tolist``,
``numpy``), copies a tensor to the host (``cpu``), or builds a tensor on the device from Python data (``torch.tensor``
with a ``device``, a pageable host-to-device copy): each of these blocks the CPU until the GPU's queue has run that
far. Each call is attributed to the innermost frame in ``cl_tool`` (``file:line``), so the step loop's own syncs
can be told apart from the data layer's and torch's.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parents[1] / "cl_tool")
_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}


def _site() -> str:
    """``cl_tool/FILE:LINE`` of the innermost cl_tool frame, prefixed by ``torch/FILE <- `` when torch made the call."""
    f, via = sys._getframe(2), ""
    if "/torch/" in f.f_code.co_filename:
        via = "torch/" + f.f_code.co_filename.rsplit("/torch/", 1)[1] + " <- "
    while f is not None:
        if f.f_code.co_filename.startswith(PACKAGE):
            return f"{via}{Path(f.f_code.co_filename).relative_to(Path(PACKAGE).parent)}:{f.f_lineno}"
        f = f.f_back
    return via + "outside cl_tool"


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as s: ...`` → ``s.sites``: a Counter of host syncs per call site."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func is torch.tensor and kwargs.get("device") is not None):
            self.sites[_site()] += 1
        return func(*args, **kwargs)

    def total(self, prefix: str = "") -> int:
        return sum(n for site, n in self.sites.items() if site.startswith(prefix))
