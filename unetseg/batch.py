"""The device-side batch hook: the one place between the loader and the forward pass
where a batch, already on the device, is transformed.

Training and evaluation both pass every batch through a :class:`BatchHook`, so what
happens there (the move to the device, the memory format, and any step added to
``steps``, e.g. augmentation that runs on the GPU instead of in loader workers) is the
same for both and is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Batch = dict[str, Any]


class BatchHook:
    """Moves ``image`` and ``mask`` to ``device`` (asynchronously from pinned memory), runs
    ``steps`` in order on the batch, then puts the image in ``memory_format``.

    Other entries (``sizes``, ``keys``, an evaluation batch's ``full_mask`` list) pass
    through untouched: they are read on the host or moved one sample at a time."""

    def __init__(self, device: torch.device | str, channels_last: bool = False,
                 steps: Sequence[Callable[[Batch], Batch]] = ()):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.steps = list(steps)

    def __call__(self, batch: Batch) -> Batch:
        out = dict(batch)
        out["image"] = batch["image"].to(self.device, non_blocking=True)
        out["mask"] = batch["mask"].to(self.device, non_blocking=True)
        for step in self.steps:
            out = step(out)
        if self.memory_format is not torch.contiguous_format:
            out["image"] = out["image"].contiguous(memory_format=self.memory_format)
        return out

    def __repr__(self) -> str:
        steps = ", ".join(getattr(s, "__name__", type(s).__name__) for s in self.steps)
        return f"BatchHook(device={self.device}, memory_format={self.memory_format}, steps=[{steps}])"
