"""torch.distributed set-up for runs launched by ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

A command is distributed when ``WORLD_SIZE`` > 1 in the environment (torchrun sets it, with
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Rank 0 writes every output; the others only compute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cl_tool.runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(device_name: str):
    """Return (DistInfo, torch.device); initialise the process group when launched by torchrun."""
    import torch
    import torch.distributed as dist

    world = world_size_from_env()
    if world <= 1:
        device = resolve_device(device_name)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # pinned buffers and new contexts go to this GPU, not GPU 0
        return DistInfo(), device
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world=world), device


def all_reduce_sum_(tensors: list, device) -> None:
    """Sum tensors over all ranks in place (no-op when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for t in tensors:
        buf = t.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t.copy_(buf.to(t.device))


def _all_reduce_values(values: list[float], device, op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return buf.tolist()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """The sums of ``values`` over all ranks (the values themselves when not distributed)."""
    return _all_reduce_values(values, device, "sum")


def all_reduce_max(values: list[float], device) -> list[float]:
    """The maxima of ``values`` over all ranks."""
    return _all_reduce_values(values, device, "max")


def global_share(count: int, world: int, device):
    """(Σ over ranks of ``count``) / ``world`` as a float32 0-d tensor on ``device``, without a host sync.

    A rank's loss Σ ℓ / share makes DDP's gradient average (Σ over ranks, ÷ world) the mean
    gradient over all the global batch's samples, however unevenly they are split (an empty share
    contributes 0). The count is made on the device by a fill (no host-to-device copy).
    """
    import torch
    import torch.distributed as dist

    total = torch.full((), float(count), dtype=torch.float32, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.div_(world)


def all_reduce_min_(t) -> None:
    """Element-wise minimum of ``t`` over all ranks, in place (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)


def wrap_ddp(model, device):
    """``DistributedDataParallel(model)`` with ``static_graph=True``.

    With a static graph DDP learns on the first step which parameters the forward pass does not
    use (a classifier of another head, timm's unused layers) and stops waiting for their gradients;
    plain DDP would fail at the second step, and ``find_unused_parameters=True`` would walk the
    autograd graph on every step instead. The loop runs the same graph every step (an empty share
    still runs every layer), which is what a static graph asks.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)


def _batchnorms(model):
    """(parent, name, module) of every BatchNorm layer that is not already a SyncBatchNorm."""
    from torch import nn

    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
    ]


def use_sync_batchnorm(model) -> list[tuple]:
    """Replace every BatchNorm layer of ``model`` by torch's SyncBatchNorm, in place; return what to restore.

    The SyncBatchNorm layers share the original layers' parameters and running-statistic tensors
    (``convert_sync_batchnorm``), so the optimiser, the penalty and the saved state see the same
    tensors; in training mode they normalise over the whole global batch (all ranks' shares), as
    one process would. Needs CUDA (torch's SyncBatchNorm refuses CPU tensors).
    """
    from torch import nn

    swaps = _batchnorms(model)
    for parent, name, child in swaps:
        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return swaps


def restore_modules(swaps: list[tuple]) -> None:
    """Put back the layers :func:`use_sync_batchnorm` replaced (their tensors were shared, so they hold the result)."""
    for parent, name, child in swaps:
        setattr(parent, name, child)


def batchnorm_note(model, world: int, device, frozen: bool) -> str | None:
    """The one-line note for BatchNorm layers trained under torchrun without SyncBatchNorm (on CPU), else None."""
    if world <= 1 or device.type == "cuda" or frozen or not _batchnorms(model):
        return None
    return (
        f"BatchNorm layers under torchrun on {device.type}: torch's SyncBatchNorm needs CUDA, so each of the {world} "
        f"processes normalises over its own share of every batch and the result differs from one process's "
        f"($freeze_bn_stats avoids this)."
    )


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group if one was set up (torch imported only if it already is)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
