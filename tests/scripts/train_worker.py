"""Run `unetseg.train` on this rank and record what the test needs to see from outside:
the keys of every training batch this rank drew, and a checksum of its final weights.

Usage (under accelerate launch or torchrun): train_worker.py OUT_DIR TRAIN_ARGS...
"""

import hashlib
import json
import sys
from pathlib import Path

import accelerate

import unetseg.stream as stream
from unetseg.train import main

out, args = Path(sys.argv[1]), sys.argv[2:]
keys: list[list[str]] = []
original_batches = stream.TrainStream._batches


def recording_batches(self, *a, **kw):
    for batch in original_batches(self, *a, **kw):
        keys.append(batch.get("keys"))
        yield batch


stream.TrainStream._batches = recording_batches
original_end = accelerate.Accelerator.end_training


def end_training(self):
    model = self.unwrap_model(self._models[0])
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    (out / f"rank{self.process_index}.json").write_text(json.dumps({"keys": keys, "weights": digest.hexdigest()}))
    original_end(self)


accelerate.Accelerator.end_training = end_training
main(args)
