"""What training reads: the training and validation shards (the embedded synthetic set by
default), the augmentation of each, the loaders that stream them to every rank, and the
batch hook that takes them onto the device (augmenting there when ``augment_on`` says so).

Validation never reads a training shard, and its classes must be the training data's:
both are checked before anything is trained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError

DEFAULT_DATA = "shards/synthetic"


@dataclass
class TrainData:
    """The shards and transforms of a run, and how many optimiser steps make an epoch."""

    train: Any
    """The training :class:`~unetseg.sources.Source`."""
    val: Any
    """The validation :class:`~unetseg.sources.Source`."""
    train_tf: Any
    eval_tf: Any
    steps_per_epoch: int
    augment_on: str = "workers"
    """Where training augmentation runs: ``workers`` or ``device`` (:mod:`unetseg.augment`)."""

    @property
    def info(self):
        return self.train.info

    @property
    def classes(self):
        return self.train.info.classes


def most_common_size(image_sizes: dict[tuple[int, int], int]) -> list[int]:
    return list(Counter(image_sizes).most_common(1)[0][0])


def ensure_default_data(config: TrainConfig, state) -> str:
    """``--data``, or the embedded synthetic set (generated once, by the main process)."""
    if config.data.data:
        return config.data.data
    if state.is_main_process and not (Path(DEFAULT_DATA) / "dataset.json").is_file():
        from unetseg.synth import synth

        print(f"generating the embedded synthetic dataset in {DEFAULT_DATA} ...", flush=True)
        synth(DEFAULT_DATA, overwrite=True, progress=False)
    state.wait_for_everyone()
    return DEFAULT_DATA


def open_sources(config: TrainConfig, data: str, state=None):
    """The training and validation shards. The validation split comes from ``--val-data``,
    else from the same folder as the training shards (for a pattern: the shards
    dataset.json lists under the validation split); never from the training shards."""
    from unetseg.sources import open_source, open_splits, sibling_split

    dc = config.data
    train = open_splits(data, dc.train_split, dc.dataset_json)
    val = open_source(dc.val_data, dc.val_split, dc.dataset_json) if dc.val_data else sibling_split(train, dc.val_split)
    if train.num_samples is None:
        raise UnetsegError(f"{data}: the training shards' sample counts are unknown. Fix: use shard names listed in dataset.json")
    shared = sorted(set(train.urls) & set(val.urls))
    if shared and val.split in train.splits and len(train.splits) > 1:
        # Asked for (--train-split train,val): the final model trains on every labelled sample.
        if state is None or state.is_main_process:
            print(f"note: the {val.split} split is trained on too, so its score during training is not a held-out "
                  "measure (fix the schedule on a held-out split first)", flush=True)
    elif shared:
        raise UnetsegError(
            f"{shared[0]}{f' and {len(shared) - 1} more' if len(shared) > 1 else ''} would be read for training and "
            "for validation, so the validation score would be measured on training data. "
            "Fix: pass --val-data with the validation shards"
        )
    a, b = train.info.classes, val.info.classes
    if (a.names, a.ignore_index) != (b.names, b.ignore_index):
        raise UnetsegError(
            f"{dc.val_data}: classes {b.names} (ignore_index {b.ignore_index}) differ from the training data's "
            f"{a.names} (ignore_index {a.ignore_index}). Fix: validate on shards packed with the same classes.json"
        )
    if val.num_samples == 0:
        raise UnetsegError(f"{val.describe()} has no samples to evaluate on. Fix: pack a validation split "
                           "(e.g. `unetseg pack --val-fraction 0.1`), or pass --val-data")
    return train, val


def train_transform(config: TrainConfig, train):
    """The training augmentation ``config.data`` describes for the ``train`` source (crop
    default: the split's most common image size)."""
    from unetseg.augment import TrainTransform, TrainTransformConfig

    dc = config.data
    crop = dc.crop_size or most_common_size(train.image_sizes())
    mean, std = config.model.normalization()  # what the (pretrained) model expects
    return TrainTransform(TrainTransformConfig(crop_size=crop, resize=dc.resize, scale_range=tuple(dc.scale_range),
                                               hflip=dc.hflip, jitter=dc.jitter, mean=mean, std=std),
                          train.info.classes.ignore_label)


def open_train_data(config: TrainConfig, state) -> TrainData:
    """The run's shards and transforms; an epoch visits every training sample at most once
    (all but fewer than a step's worth per rank)."""
    from unetseg.stream import batches_per_epoch
    from unetseg.augment import augment_on
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    dc = config.data
    train, val = open_sources(config, ensure_default_data(config, state), state)
    train_tf = train_transform(config, train)
    mean, std = config.model.normalization()
    eval_tf = EvalTransform(EvalTransformConfig(resize=dc.eval_resize, mean=mean, std=std))
    accum = config.optim.grad_accum
    steps = batches_per_epoch(train.num_samples, dc.batch_size, state.num_processes, accum) // accum
    return TrainData(train, val, train_tf, eval_tf, steps, augment_on(dc.augment_on, state.device))


def train_batches(config: TrainConfig, data: TrainData, rank: int, world: int, start_step: int, stats) -> Iterator[dict[str, Any]]:
    """This rank's training batches from optimiser step ``start_step`` on (exact on resume)."""
    from unetseg.loaders import iterate, make_loader
    from unetseg.stream import TrainStream

    dc, accum = config.data, config.optim.grad_accum
    stream = TrainStream(data.train, data.train_tf, dc.batch_size, batches_per_epoch=data.steps_per_epoch * accum,
                         rank=rank, world_size=world, seed=config.run.seed, start_batch=start_step * accum,
                         shuffle_buffer=dc.shuffle_buffer, max_bad_samples=dc.max_bad_samples,
                         augment_on=data.augment_on)
    return iterate(make_loader(stream, dc.num_workers), stats)


def eval_loader(config: TrainConfig, data: TrainData, rank: int, world: int):
    """This rank's share of the validation split, every sample once over all ranks."""
    from unetseg.loaders import make_loader
    from unetseg.stream import EvalStream

    dc = config.data
    stream = EvalStream(data.val, data.eval_tf, dc.eval_batch_size or dc.batch_size, rank=rank, world_size=world,
                        max_bad_samples=dc.max_bad_samples)
    return make_loader(stream, dc.num_workers)


def batch_hook(config: TrainConfig, device, data: TrainData):
    """What every batch goes through on the device: the move there, the training
    augmentation when it runs there, and the memory format."""
    from unetseg.augment import DeviceAugment
    from unetseg.batch import BatchHook
    from unetseg.runtime import channels_last

    steps = [DeviceAugment(data.train_tf)] if data.augment_on == "device" else []
    return BatchHook(device, channels_last(config, device), steps)
