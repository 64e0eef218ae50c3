"""Rank, world size and summing all-reduce that also work without a process group.

These helpers talk to ``torch.distributed`` directly rather than going through
Accelerate, so they behave the same in a script started by ``accelerate launch``,
by ``torchrun``, by a hand-written ``init_process_group`` call, or in a plain
single process where no process group exists (rank 0 of a world of size 1, and
reductions are no-ops).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_reduce_sum", "end_process_group", "get_rank", "get_world_size", "is_dist"]


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process, 0 when there is no process group."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 when there is no process group."""
    return dist.get_world_size() if is_dist() else 1


def _backend_for(device_type: str) -> str | None:
    """Name of the backend the default group uses for tensors on ``device_type``.

    ``dist.get_backend()`` is either a single name (``"gloo"``, ``"nccl"``), which
    then serves every device it supports, or a per-device list such as
    ``"cpu:gloo,cuda:nccl"``; in the latter a device that is not listed has no backend.
    """
    backend = str(dist.get_backend())
    if ":" not in backend:
        return backend
    per_device = dict(item.split(":", 1) for item in backend.split(","))
    return per_device.get(device_type)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place, and return it.

    Without an initialised process group this returns ``tensor`` untouched, so
    the same code runs in a single process. NCCL only reduces CUDA tensors: when
    the group's backend for the tensor's device is NCCL (or there is none, as for
    a CPU tensor in a ``"cuda:nccl"`` group), the tensor is copied to this
    process's current CUDA device, reduced there and copied back, so callers can
    keep small bookkeeping tensors on the CPU whatever the backend. (Other
    accelerator-only backends are passed the tensor as it is.)
    """
    if not is_dist():
        return tensor
    backend = _backend_for(tensor.device.type)
    if tensor.device.type != "cuda" and backend in (None, "nccl") and torch.cuda.is_available():
        staging = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staging, op=dist.ReduceOp.SUM)
        tensor.copy_(staging)
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def end_process_group() -> None:
    """Destroy the default process group if one is left (after an error, say): without
    it gloo often aborts the process at exit."""
    if is_dist():
        dist.destroy_process_group()
