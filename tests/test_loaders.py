"""The DataLoader around the streams: bad-sample bookkeeping taken off every batch, and
workers that survive a launcher's SIGTERM and die of their own process's."""

from __future__ import annotations

import subprocess
import time

import torch

from conftest import make
from unetseg.badsamples import StreamStats
from unetseg.loaders import iterate, make_loader
from unetseg.sources import open_source
from unetseg.stream import EvalStream, TrainStream
from unetseg.augment import TrainTransform, TrainTransformConfig
from unetseg.transforms import EvalTransform, EvalTransformConfig


def _idle_worker() -> None:
    from unetseg.loaders import _worker_init

    _worker_init(0)
    while True:
        time.sleep(0.05)


def test_loader_workers_die_of_sigterm_from_their_own_process_only(tmp_path):
    """A launcher's or SLURM's SIGTERM reaches the DataLoader workers too; the training
    process must stay in charge of stopping them (it checkpoints first)."""
    import multiprocessing

    folder = make(tmp_path, "s", train=6, val=1)
    loader = make_loader(TrainStream(open_source(folder, "train"),
                                     TrainTransform(TrainTransformConfig(crop_size=16), 255), 2, batches_per_epoch=3), 1)
    it = iter(loader)
    next(it)
    (worker,) = it._workers
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
    time.sleep(0.5)
    assert worker.is_alive()
    for _ in range(4):  # and it goes on serving batches
        assert next(it)["image"].shape[0] == 2
    it._shutdown_workers()
    assert not worker.is_alive()
    # The clean-up of DataLoader and multiprocessing (terminate, from the parent) still works.
    process = multiprocessing.get_context("fork").Process(target=_idle_worker, daemon=True)
    process.start()
    time.sleep(0.5)
    subprocess.run(["kill", "-TERM", str(process.pid)], check=True)
    time.sleep(0.3)
    assert process.is_alive()
    process.terminate()
    process.join(timeout=10)
    assert process.exitcode == -15


def test_iterate_counts_bad_samples_and_drops_empty_batches(tmp_path):
    folder = make(tmp_path, "s", train=1, val=5)
    stream = EvalStream(open_source(folder, "val"), EvalTransform(EvalTransformConfig()), 2)
    loader = make_loader(stream, 0)
    assert loader.batch_size is None and not loader.persistent_workers
    stats = StreamStats()
    batches = list(iterate(loader, stats))
    assert [len(b["keys"]) for b in batches] == [2, 2, 1] and stats.bad_samples == 0
    assert all(isinstance(b["image"], torch.Tensor) and "_bad" not in b for b in batches)
