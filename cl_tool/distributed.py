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
        return DistInfo(), resolve_device(device_name)
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
