"""Worker for tests/test_optim.py: record the learning rate of every optimiser step.

Run on one process (``python tests/scripts/schedule_worker.py OUT``) or several
(``accelerate launch --multi_gpu --num_processes 2 ... tests/scripts/schedule_worker.py OUT``;
without GPUs, with ``ACCELERATE_USE_CPU=1`` in the environment so that Accelerate
uses gloo on the CPU — the worker exits with an error if Accelerate does not see
``WORLD_SIZE`` processes).
For each case it trains a tiny model through a prepared dataloader with
``accelerator.accumulate`` and writes ``OUT/rank{R}.json``::

    {"num_processes": P, "rank": R, "schedule": {...LRSchedule fields...}, "base_lr": ...,
     "cases": {NAME: {"accumulation": k, "prepared": bool,
                      "lrs": [lr used by each real optimiser step],
                      "final_lr": lr after the last step, "last_epoch": scheduler.last_epoch,
                      "step_count": scheduler._step_count}}}

Cases: ``ours``/``ours_accum2`` step the unprepared scheduler with
``unetseg.optim.step_scheduler`` (the project's approach, accumulation 1 and 2);
``naive``/``naive_accum2`` pass it to ``accelerator.prepare`` with Accelerate's
defaults and call ``scheduler.step()`` after every ``optimizer.step()``, as
Accelerate's examples do.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unetseg.optim import LRSchedule, build_optimizer, build_scheduler, step_scheduler

BASE_LR = 0.1
OPT_STEPS = 12
SCHEDULE = LRSchedule(name="poly", total_steps=OPT_STEPS, warmup_steps=3, power=0.9, min_lr_ratio=0.05)


def run_case(accumulation: int, prepared: bool) -> dict:
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    # OPT_STEPS * accumulation batches of 2 samples on every process.
    n = OPT_STEPS * accumulation * 2 * accelerator.num_processes
    data = TensorDataset(torch.randn(n, 3, 4, 4), torch.randint(0, 2, (n, 4, 4)))
    loader = DataLoader(data, batch_size=2, shuffle=False)
    optimizer = build_optimizer(model, "sgd", lr=BASE_LR, weight_decay=1e-4)
    if prepared:
        # What Accelerate's examples do.
        scheduler = build_scheduler(optimizer, **dataclasses.asdict(SCHEDULE))
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:
        # The call sequence of the unetseg.optim module docstring.
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        scheduler = build_scheduler(optimizer, **dataclasses.asdict(SCHEDULE))
        accelerator.register_for_checkpointing(scheduler)
    assert len(loader) == OPT_STEPS * accumulation, len(loader)  # batches per process
    assert len(loader) // accumulation == SCHEDULE.total_steps  # whole optimiser steps

    lrs = []
    for image, mask in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(image), mask)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if prepared:
                scheduler.step()
            else:
                step_scheduler(scheduler, accelerator)
            optimizer.zero_grad()
    inner = scheduler.scheduler if prepared else scheduler
    result = {
        "accumulation": accumulation,
        "prepared": prepared,
        "lrs": lrs,
        "final_lr": optimizer.param_groups[0]["lr"],
        "last_epoch": inner.last_epoch,
        "step_count": inner._step_count,
    }
    # Drop this case's DDP model (and the rest) now, while the process group is alive:
    # one still around when end_training() destroys the group aborts the process at exit.
    accelerator.free_memory(model, optimizer, loader, scheduler)
    return result


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cases = {
        "ours": (1, False),
        "ours_accum2": (2, False),
        "naive": (1, True),
        "naive_accum2": (2, True),
    }
    accelerator = Accelerator()
    # On a machine without GPUs, `accelerate launch --multi_gpu` starts the processes and
    # Accelerate even creates a process group, but unless ACCELERATE_USE_CPU is set its
    # state says DistributedType.NO with one process: every rank would run alone.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world_size:
        raise SystemExit(
            f"Accelerate sees {accelerator.num_processes} process(es) ({accelerator.distributed_type}) "
            f"but WORLD_SIZE is {world_size}; on a CPU-only machine set ACCELERATE_USE_CPU=1"
        )
    results = {name: run_case(*args) for name, args in cases.items()}
    record = {
        "num_processes": accelerator.num_processes,
        "rank": accelerator.process_index,
        "schedule": dataclasses.asdict(SCHEDULE),
        "base_lr": BASE_LR,
        "cases": results,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=1))
    gc.collect()
    accelerator.wait_for_everyone()
    # Destroys the process group: without it gloo aborts at exit in a good share of runs.
    accelerator.end_training()


if __name__ == "__main__":
    main()
