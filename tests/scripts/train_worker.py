"""Run `unetseg.train` on this rank and record what the test needs to see from outside:
the keys of every training batch this rank drew, checksums of its final parameters and
buffers (BatchNorm statistics, which DDP re-broadcasts from rank 0 at each forward), and,
at the first forward pass, checksums of the parameters and of the random number
generator's state (the initial weights must agree across ranks, the dropout RNG not).

Usage (under accelerate launch or torchrun, or plain python): train_worker.py OUT_DIR TRAIN_ARGS...

Test hooks, from the environment:
- ``STALE_CHECKPOINT_VIEW_RANK=R``: on rank R, the run dir's latest checkpoint looks like
  the oldest one (a shared file system whose listing lags behind).
- ``SIGTERM_IN_EVAL=N``: this process sends itself SIGTERM once its N-th evaluation has
  scored its first batch (a stop that arrives during an evaluation).
- ``FAIL_SAVE=R:STEP``: on rank R, writing the checkpoint of step STEP fails as on a full
  disk (``OSError`` ENOSPC, after a part of it is written).
- ``NAN_LOSS=R:CALL``: on rank R, the CALL-th training loss (counting micro-batches from 1)
  is NaN (one rank's loss failing alone).
- Always recorded: ``syncs``, for each call of ``train_step``, how many times it read a
  tensor's value on the host (``aten._local_scalar_dense``: ``.item()``, ``bool()``,
  ``float()`` of a tensor; on a GPU each is a wait for the device), leaving out the
  loader's reads while it yields a batch (host tensors, even on a GPU machine).
- ``SLOW_SAVE=MARKER``: the first checkpoint written while MARKER does not exist takes 30 s
  more, after its files are written and before it is complete (MARKER is created then,
  holding this pid): time for a test to kill the process in the middle of a save.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import accelerate
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unetseg.train as train

import unetseg.checkpoint as checkpoint
import unetseg.scoring as scoring
import unetseg.stream as stream
from unetseg.train import main

out, args = Path(sys.argv[1]), sys.argv[2:]
rank = os.environ.get("RANK", "0")
(out / f"pid{rank}").write_text(str(os.getpid()))  # for tests that signal one rank
keys: list[list[str]] = []
first_forward: dict[str, str] = {}
syncs: list[int] = []
original_batches = stream.TrainStream._batches


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(tensors):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def recording_batches(self, *a, **kw):
    for batch in original_batches(self, *a, **kw):
        keys.append(batch.get("keys"))
        yield batch


stream.TrainStream._batches = recording_batches
original_prepare = accelerate.Accelerator.prepare


def prepare(self, *objects, **kw):
    prepared = original_prepare(self, *objects, **kw)
    model = self.unwrap_model(self._models[0])

    def record(module, inputs):
        if not first_forward and module.training:
            first_forward["params"] = digest(module.named_parameters())
            first_forward["rng"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()

    model.register_forward_pre_hook(record)
    return prepared


accelerate.Accelerator.prepare = prepare
original_end = accelerate.Accelerator.end_training


def end_training(self):
    model = self.unwrap_model(self._models[0])
    record = {"keys": keys, "syncs": syncs, "params": digest(model.named_parameters()), "buffers": digest(model.named_buffers()),
              "first_forward": first_forward}
    (out / f"rank{self.process_index}.json").write_text(json.dumps(record))
    original_end(self)


accelerate.Accelerator.end_training = end_training

if os.environ.get("STALE_CHECKPOINT_VIEW_RANK") == rank:
    def oldest_checkpoint(run_dir):
        found = checkpoint.list_checkpoints(run_dir)
        return found[0][1] if found else None

    checkpoint.latest_checkpoint = oldest_checkpoint

if "SIGTERM_IN_EVAL" in os.environ:
    nth = int(os.environ["SIGTERM_IN_EVAL"])
    original_cm = scoring.confusion_matrix
    evaluations = [0]

    def confusion_matrix(model, batches, *a, **kw):
        evaluations[0] += 1

        def signalling(count=evaluations[0]):
            for i, batch in enumerate(batches):
                yield batch
                if i == 0 and count == nth:
                    os.kill(os.getpid(), signal.SIGTERM)

        return original_cm(model, signalling(), *a, **kw)

    scoring.confusion_matrix = confusion_matrix

if "FAIL_SAVE" in os.environ or "SLOW_SAVE" in os.environ:
    import errno
    import time

    original_save = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        result = original_save(self, output_dir, **kw)
        fail_rank, _, fail_step = os.environ.get("FAIL_SAVE", "-1:-1").partition(":")
        if rank == fail_rank and Path(output_dir).name.startswith(f"step-{int(fail_step):08d}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir)
        marker = os.environ.get("SLOW_SAVE")
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(30)
        return result

    accelerate.Accelerator.save_state = save_state



class CountHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.reads += 1
        return func(*args, **(kwargs or {}))


original_step = train.train_step


def counted_step(run, batches, *a, **kw):
    def loader():
        while True:
            mode.paused = True
            try:
                batch = next(batches)
            finally:
                mode.paused = False
            yield batch

    with CountHostReads() as mode:
        result = original_step(run, loader(), *a, **kw)
    syncs.append(mode.reads)
    return result


train.train_step = counted_step

if "NAN_LOSS" in os.environ:
    import unetseg.losses as losses

    nan_rank, _, nan_call = os.environ["NAN_LOSS"].partition(":")
    original_loss = losses.SegmentationLoss.forward
    calls = [0]

    def nan_loss(self, *a, **kw):
        loss = original_loss(self, *a, **kw)
        calls[0] += 1
        return loss * float("nan") if rank == nan_rank and calls[0] == int(nan_call) else loss

    losses.SegmentationLoss.forward = nan_loss

main(args)
