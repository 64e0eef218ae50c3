"""Run `unetseg.train` on this rank and record what the test needs to see from outside:
the keys of every training batch this rank drew, and checksums of its final parameters
and buffers (BatchNorm statistics, which DDP re-broadcasts from rank 0 at each forward).

Usage (under accelerate launch or torchrun): train_worker.py OUT_DIR TRAIN_ARGS...
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import accelerate

import unetseg.stream as stream
from unetseg.train import main

out, args = Path(sys.argv[1]), sys.argv[2:]
(out / f"pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))  # for tests that signal one rank
keys: list[list[str]] = []
original_batches = stream.TrainStream._batches


def recording_batches(self, *a, **kw):
    for batch in original_batches(self, *a, **kw):
        keys.append(batch.get("keys"))
        yield batch


stream.TrainStream._batches = recording_batches
original_end = accelerate.Accelerator.end_training


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(tensors):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def end_training(self):
    model = self.unwrap_model(self._models[0])
    record = {"keys": keys, "params": digest(model.named_parameters()), "buffers": digest(model.named_buffers())}
    (out / f"rank{self.process_index}.json").write_text(json.dumps(record))
    original_end(self)


accelerate.Accelerator.end_training = end_training
main(args)
