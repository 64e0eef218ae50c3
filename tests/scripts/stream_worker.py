"""One rank of the multi-process streaming test: records which keys each stream gave it.

The val shards must also be there as copy-000000.tar, ... (names dataset.json does not
list, so their sample counts are unknown).

Usage: stream_worker.py OUT_DIR DATA_FOLDER [DATA_FOLDER ...]
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from unetseg.badsamples import StreamStats
from unetseg.sources import open_source
from unetseg.loaders import iterate, make_loader
from unetseg.stream import EvalStream, TrainStream, batches_per_epoch
from unetseg.augment import TrainTransform, TrainTransformConfig
from unetseg.transforms import EvalTransform, EvalTransformConfig

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out, folders = Path(sys.argv[1]), sys.argv[2:]
results = {}
for folder in folders:
    n_val = len(open_source(folder, "val").urls)
    for workers in (0, 2):
        for counts in ("known", "unknown"):
            if counts == "known":
                source = open_source(folder, "val")
            else:  # a real pattern over copies of the val shards that dataset.json does not list
                source = open_source(f"{folder}/copy-{{000000..{n_val - 1:06d}}}.tar", "val")
                assert source.counts is None, source.counts
            stream = EvalStream(source, EvalTransform(EvalTransformConfig()), 2, rank=rank, world_size=world)
            keys = [k for b in iterate(make_loader(stream, workers), StreamStats()) for k in b["keys"]]
            results[f"eval|{folder}|{workers}|{counts}"] = keys
    source = open_source(folder, "train")
    per_epoch = batches_per_epoch(source.num_samples, 2, world)
    for workers in (0, 2):
        stream = TrainStream(source, TrainTransform(TrainTransformConfig(crop_size=16), source.info.classes.ignore_label),
                             2, batches_per_epoch=per_epoch, rank=rank, world_size=world, seed=3, shuffle_buffer=4)
        batches = iterate(make_loader(stream, workers), StreamStats())
        results[f"train|{folder}|{workers}"] = {"per_epoch": per_epoch,
                                                "batches": [next(batches)["keys"] for _ in range(2 * per_epoch)]}
(out / f"rank{rank}.json").write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
