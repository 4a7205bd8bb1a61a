"""Where and how a command computes: device, precision (autocast), seeding, its own command line.

No torch import at module level; every function imports what it uses.
"""

from __future__ import annotations

import sys
import time

from cl_tool.errors import EnvironmentProblem, UsageError
from cl_tool.params import option

PRECISIONS = ("fp32", "bf16", "fp16")
_STARTED = [time.perf_counter()]  # when this command began (import of cl-tool, or the last mark_start)


def mark_start() -> None:
    """The command starts now (the CLI calls this on entry; set-up time is measured from here)."""
    _STARTED[0] = time.perf_counter()


def started_at() -> float:
    return _STARTED[0]


DEVICES_TEXT = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str):
    """``auto`` → cuda if available, else mps, else cpu; check explicit names against the machine."""
    import torch

    name = (name or "auto").strip()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"$device {name} is not a device name; use {DEVICES_TEXT}.") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"$device {name} is not supported; use {DEVICES_TEXT}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"$device {name} was asked for but CUDA is not available on this machine; use $device cpu or auto."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"$device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); pick an index below that."
            )
    if dev.type == "mps" and not mps:
        raise EnvironmentProblem(
            f"$device {name} was asked for but MPS is not available on this machine; use $device cpu or auto."
        )
    return dev


def autocast(device, precision: str):
    """A context manager running the forward pass in ``precision`` (fp32: no autocast)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


CUBLAS_WORKSPACE = ":4096:8"  # the cuBLAS workspace setting under which its GEMMs are deterministic
_DEBUG = [False]


def set_debug(on: bool) -> None:
    """``--debug`` was given (commands then also print how they sized their work)."""
    _DEBUG[0] = bool(on)


def debug_enabled() -> bool:
    return _DEBUG[0]


def set_deterministic(device) -> None:
    """``torch.use_deterministic_algorithms(True)`` and what CUDA needs for it.

    On CUDA: ``CUBLAS_WORKSPACE_CONFIG`` (unless the user set it) before the first GEMM creates
    cuBLAS's handle, without which torch refuses every matmul; cuDNN's autotuner off and its
    deterministic algorithms on. A layer with no deterministic CUDA kernel still fails when it runs:
    :func:`deterministic_error` turns that into one sentence.
    """
    import os

    import torch

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def deterministic_error(exc: BaseException) -> EnvironmentProblem | None:
    """The one-sentence error for torch's refusal of an operation without a deterministic kernel, else None."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "does not have a deterministic implementation" not in text:
        return None
    op = text.split(" does not have", 1)[0].strip().splitlines()[-1]
    return EnvironmentProblem(
        f"$deterministic: {op} has no deterministic implementation on this device in torch "
        f"{__import__('torch').__version__}; drop $deterministic (results then vary in the last bits) or use $device cpu."
    )


def set_cuda_precision(device) -> None:
    """TF32 off for matmuls and cuDNN convolutions on CUDA: ``--precision fp32`` computes in float32.

    TF32 (Ampere and later) rounds matmul inputs to 10 mantissa bits; torch leaves it off for
    matmuls but on for cuDNN convolutions, so an fp32 ResNet and an fp32 MLP would round
    differently. For tensor-core speed use ``--precision bf16``.
    """
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def skip_dynamo_import() -> None:
    """Let torch's ``@_disable_dynamo`` wrappers (optimizer construction, state dicts, ...) call straight through.

    Those wrappers import ``torch._dynamo`` (2-10 s on a small CPU) on first use only to keep
    ``torch.compile`` from tracing the wrapped function; cl-tool never compiles, so the function is
    called as it is. Uses torch's own cache attribute of the wrapper; if a torch version changes
    that, this does nothing and the import happens as before.
    """
    import torch

    try:
        probe = torch._compile._disable_dynamo(lambda: None)
        code = probe.__code__
    except Exception:  # noqa: BLE001 - a torch without this mechanism: nothing to skip
        return
    for owner in (torch.optim.Optimizer, *torch.optim.Optimizer.__subclasses__()):
        for member in vars(owner).values():
            fn = getattr(member, "__wrapped__", None)
            if (
                fn is not None
                and getattr(member, "__code__", None) is code
                and getattr(fn, "__dynamo_disable", None) is None
            ):
                fn.__dynamo_disable = fn


def cpu_sample() -> tuple[float, float, float] | None:
    """(wall s, CPU s the whole machine has been busy, CPU s of this process) now; None where /proc/stat is not
    there. Busy = every state of the first ``cpu`` line of /proc/stat but idle and iowait (guest time is already in
    user); CPU seconds summed over the CPUs."""
    import os

    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if not fields or fields[0] != "cpu" or len(ticks) < 5:
        return None
    own = os.times()
    return time.perf_counter(), (sum(ticks) - ticks[3] - ticks[4]) / hz, own.user + own.system


#: /proc/stat counts in ticks of 10 ms: a shorter window says too little.
MIN_WINDOW_S = 0.1


def busy_elsewhere(start, end) -> float | None:
    """How many CPUs other processes kept busy between two :func:`cpu_sample` readings (machine busy − this
    process's CPU time, over the wall time); None without both readings or a window under :data:`MIN_WINDOW_S`."""
    if start is None or end is None or end[0] - start[0] < MIN_WINDOW_S:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


class OthersBusy:
    """``others()``: the CPUs other processes kept busy since the previous call (None: unknown, e.g. not Linux)."""

    def __init__(self):
        self.last = cpu_sample()

    def __call__(self) -> float | None:
        now = cpu_sample()
        busy, self.last = busy_elsewhere(self.last, now), now
        return busy


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
KEEP_BELOW_BYTES = 32 << 20  # blocks up to this size come from (and go back to) the heap
TRIM_ABOVE_BYTES = 128 << 20  # free memory at the top of the heap is given back above this


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks instead of giving them back to the system at once; True if it was set.

    By default glibc maps every block over 128 KiB on its own and unmaps it when freed (its threshold rises only
    after a larger block has been freed), and returns free memory at the top of the heap beyond 128 KiB. A training
    step allocates and frees its gradients and the optimiser's temporaries (~1 MB each for the paper MLP) every
    step, so every step faults them in afresh (a zeroed page each 4 KiB; the README's performance notes give the
    effect). Sets M_MMAP_THRESHOLD (32 MiB) and M_TRIM_THRESHOLD (128 MiB), as the ``MALLOC_*_`` variables would;
    does nothing where malloc is not glibc's or the user set those variables.
    """
    import ctypes
    import os
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_ABOVE_BYTES)
        )
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def command_line() -> str:
    """This process's command line as the user typed it (recorded in a checkpoint's history)."""
    return " ".join(["cl-tool"] + sys.argv[1:])


def device_option():
    return option("auto", "--device", metavar="DEVICE", help=f"{DEVICES_TEXT}.")


def precision_option():
    return option(
        "fp32",
        "--precision",
        metavar="fp32|bf16|fp16",
        choices=PRECISIONS,
        help="fp32, bf16 or fp16 (autocast; statistics and the penalty stay in fp32).",
    )


def seed_option():
    return option(0, "--seed", metavar="N", low=0, high=2**32 - 1, help="Random seed.")
