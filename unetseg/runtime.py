"""Where a process runs and how the processes of a run agree: the accelerator, the stop
flag set by SIGTERM/SIGINT, decisions taken by the main process for every rank, and the
BatchNorm statistics every rank must share before it evaluates or saves.

Train and evaluate both start here, so neither imports the other.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import torch

from unetseg.errors import UnetsegError


def has_accelerator() -> bool:
    """Whether a GPU-like device exists; without one Accelerate must be told ``cpu=True`` to
    form a (gloo) process group over several CPU processes."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def make_accelerator(mixed_precision: str | None = None, **kwargs: Any):
    """An ``Accelerator`` on the GPU when there is one, else on the CPU, with a process
    group whenever the launcher started several processes."""
    from accelerate import Accelerator

    return Accelerator(cpu=not has_accelerator(), mixed_precision=mixed_precision, **kwargs)


def slow_bf16_warning(mixed_precision: str, device: torch.device) -> str | None:
    """A warning for bf16 autocast on a CPU without native bf16 (AVX-512 BF16 or AMX), where
    oneDNN emulates it: the CPU recipe trained at 0.2 images/s in bf16 against 3.8 in fp32 on
    an AVX2-only CPU (docs/benchmarks.md). None where bf16 is native or not asked for."""
    if mixed_precision != "bf16" or device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"warning: --mixed-precision bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}: "
            "no AVX-512 BF16 or AMX) is emulated and trains many times slower than fp32. Fix: --mixed-precision no")


def process_state():
    """Accelerate's process state, for the work done before the accelerator exists."""
    from accelerate import PartialState

    return PartialState(cpu=not has_accelerator())


class StopFlag:
    """Set by SIGTERM/SIGINT. The loop reads it (and agrees on it across ranks) between
    micro-batches and between evaluation batches: stopping inside a collective would hang
    the other ranks, and a launcher gives little time after SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None

    def __call__(self, signum, frame) -> None:
        self.requested, self.signal = True, signal.Signals(signum).name

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only and hand every process its result, or raise
    its :class:`UnetsegError` on every process, so that all ranks take the same decision
    (the run dir, the checkpoint to resume from) even when their views of a shared file
    system differ for a moment."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if PartialState().is_main_process:
        try:
            box[0] = ("ok", fn())
        except UnetsegError as e:
            box[0] = ("error", str(e))
    broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise UnetsegError(value)
    return value


def channels_last(config, device: torch.device) -> bool:
    """Whether the model and batches use channels_last (``run.channels_last``; auto: CUDA)."""
    choice = config.run.channels_last
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def compiled(config, device: torch.device) -> bool:
    """Whether the model is compiled (``run.compile``; auto: CUDA)."""
    return compile_on(config.run.compile, device)


def compile_on(choice: str, device: torch.device) -> bool:
    """``auto|on|off`` to a yes or no: auto compiles on CUDA only (on a CPU, compiling
    takes minutes and rarely pays)."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def check_sync_bn(sync_bn: bool, state) -> None:
    """SyncBatchNorm has no CPU kernel: refuse before any model is built."""
    if sync_bn and state.num_processes > 1 and state.device.type == "cpu":
        raise UnetsegError(
            f"--sync-bn: SyncBatchNorm runs on GPUs only, and this run has {state.num_processes} CPU processes. "
            "Fix: drop --sync-bn (each process then normalises its own batches; the running statistics are "
            "averaged over processes before every evaluation and save), or use --model-norm group"
        )


def sync_buffers(net: torch.nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks (each rank updated them with its own
    batches since DDP last broadcast them), so every rank evaluates, and rank 0 saves,
    the same model."""
    if world == 1:
        return
    from unetseg.distributed import all_reduce_sum

    # Integer buffers (num_batches_tracked) are the same on every rank already.
    for buffer in net.buffers():
        if buffer.is_floating_point():
            buffer.copy_(all_reduce_sum(buffer.detach().clone()) / world)
