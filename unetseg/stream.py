"""Streaming shards into batches: the training stream and the exact-once evaluation stream.

Owns reading a :class:`~unetseg.sources.Source`'s shards in the DataLoader workers (decode,
augment, batch, and the seeds that make it reproducible). Where shards are:
:mod:`unetseg.sources`; counting bad samples: :mod:`unetseg.badsamples`; the DataLoader
around the streams and its workers' signals: :mod:`unetseg.loaders`.

Training stream (:class:`TrainStream`)
    Exact epochs: an epoch visits every sample at most once, and all but fewer than a
    step's worth per rank. Each epoch draws a shard order and a starting point from the
    seed (the same on every rank), lays the split's samples out in that order, and cuts
    it into one contiguous share per rank, each share cut again in proportion to the
    batches each DataLoader worker serves (the DataLoader takes batches from its workers
    in turn). A worker reads its share (any number of shards, or part of one: fewer
    shards than readers work) through a shuffle buffer, decodes, draws each sample's
    augmentation parameters and batches, augmenting there or leaving that to the device
    (``augment_on``, :mod:`unetseg.augment`).
    Every rank takes the same number of batches per epoch (:func:`batches_per_epoch`),
    so no rank waits for another; the stream runs on from epoch to epoch without
    restarting its workers.

    What is reproducible: for a given seed, world size, worker count, batch size,
    ``batches_per_epoch`` and data, batch *b* of rank *r* is always the same, and a
    stream started at ``start_batch=k`` yields exactly the batches a stream started at 0
    yields from *k* on (resume mid-epoch). Each sample's augmentation parameters are drawn
    from its place in the epoch (epoch, rank, batch, slot in the batch). A sample that fails to
    decode is skipped; when that leaves a worker short, it reads its share again, so
    with bad samples an epoch may visit a sample twice, and resume is exact only on data
    without bad samples.

Evaluation stream (:class:`EvalStream`)
    Every sample of a split exactly once across all ranks and workers: with per-shard
    sample counts (from ``dataset.json``) the split's samples, in shard order, are cut
    into one contiguous range per (rank, worker), so splits with fewer shards than
    readers are split by sample; without counts, whole shards are dealt round-robin.
    Ranks may get different numbers of batches; nothing is padded or repeated.

Bad data
    A sample that fails to decode, or the part of a shard that cannot be read, is skipped
    and recorded in the worker's ``BadLog``; batches carry the new records to :func:`iterate`,
    which hands them to ``StreamStats`` (both in :mod:`unetseg.badsamples`).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from unetseg.badsamples import DEFAULT_MAX_BAD_SAMPLES, BadLog
from unetseg.errors import UnetsegError
from unetseg.shards import IMAGE_EXTS, MASK_EXT, ShardReadError, iter_shard
from unetseg.sources import Source
from unetseg.augment import TrainTransform
from unetseg.transforms import EvalTransform

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they are still
# the fastest decoders here (docs/benchmarks.md), so keep them and keep the logs quiet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)

DEFAULT_SHUFFLE_BUFFER = 256
# A stream that reads this many shards in a row without one good sample stops.
_MAX_EMPTY_SHARDS = 50


# --- decoding and batching -------------------------------------------------------------


def _decode(data: bytes, role: str, mode: ImageReadMode) -> torch.Tensor:
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{role} does not decode ({e})") from None


def decode_pair(sample: dict[str, Any]) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Decode a raw shard sample with ``torchvision.io`` (measured faster than Pillow for
    both JPEG and PNG: docs/benchmarks.md). Raises ``ValueError`` on any problem, a
    16-bit image or mask included. Training, evaluation, ``shards verify`` and
    ``shards preview`` all decode with this, so they agree on what a good sample is."""
    exts = [e for e in IMAGE_EXTS if e in sample]
    if len(exts) != 1 or MASK_EXT not in sample:
        raise ValueError(f"expected one image ({'/'.join(IMAGE_EXTS)}) and a {MASK_EXT}, found {sorted(sample)}")
    image = _decode(sample[exts[0]], "image", ImageReadMode.RGB)
    mask = _decode(sample[MASK_EXT], "mask", ImageReadMode.UNCHANGED)
    if image.dtype != torch.uint8:
        # A 16-bit PNG decodes as uint16, which the uint8 batches would wrap; pack refuses
        # such images, so this one was written by something else.
        raise ValueError(f"image is {image.dtype} (a 16-bit PNG?), expected 8 bits per channel; "
                         "convert the images to 8 bits and pack them again")
    if mask.shape[0] != 1:
        raise ValueError(f"mask has {mask.shape[0]} channels, expected 1")
    if mask.dtype != torch.uint8:
        raise ValueError(f"mask is {mask.dtype} (a 16-bit PNG?), expected 8-bit class ids; `unetseg pack` writes those")
    if image.shape[1:] != mask.shape[1:]:
        raise ValueError(f"image is {tuple(image.shape[1:])} but mask is {tuple(mask.shape[1:])}")
    return tv_tensors.Image(image), tv_tensors.Mask(mask[0])


def collate(images: list[torch.Tensor], masks: list[torch.Tensor], pad_label: int,
            mask_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack, padding to the largest size in the batch (bottom/right): images with 0,
    masks with ``pad_label`` so the padding counts in no loss or metric."""
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    image_batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask_batch = torch.full((len(masks), height, width), pad_label, dtype=mask_dtype)
    for i, (img, m) in enumerate(zip(images, masks)):
        image_batch[i, :, : img.shape[-2], : img.shape[-1]] = img
        mask_batch[i, : m.shape[-2], : m.shape[-1]] = m
    return image_batch, mask_batch


# The tuple lengths seeds are drawn from (the epoch's shard order and train.py's process
# seed: 3; the shuffle buffer: 5; augmentation and preview: 6). They reach SeedSequence as
# they always did, one word per part, so a run resumed across versions keeps its streams.
_KEPT_LENGTHS = (3, 5, 6)


def _entropy(parts: tuple[int, ...]) -> list[int]:
    """The 32-bit words SeedSequence hashes for ``parts``, distinct for distinct tuples.

    The parts themselves would not do: SeedSequence pads fewer than 4 words with zeros, so
    ``(a, b)``, ``(a, b, 0)`` and ``(a, b, 0, 0)`` would hash alike, and it splits a part of
    32 bits or more into words, so ``(2**32,)`` would hash as ``(0, 1)``. So only a tuple of
    a kept length with 32-bit parts goes as it is: 4 words once padded (length 3), 5 or 6.
    Any other tuple is spelled out, each part as its word count then its words, padded
    to 6 words and ended by the spelling's length: 7 words or more, which no kept tuple
    has, and that spell one tuple only."""
    values = [int(p) for p in parts]
    if any(v < 0 for v in values):
        raise ValueError(f"derive_seed{tuple(values)}: parts must be non-negative")
    if len(values) in _KEPT_LENGTHS and all(v < 2**32 for v in values):
        return values
    spelled: list[int] = []
    for v in values:
        words = [(v >> shift) & 0xFFFFFFFF for shift in range(0, max(v.bit_length(), 1), 32)]
        spelled += [len(words), *words]
    return spelled + [0] * (max(_KEPT_LENGTHS) - len(spelled)) + [len(spelled)]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of non-negative integers (``numpy.random.SeedSequence``
    over :func:`_entropy`): distinct tuples give unrelated streams, ``(a, b)`` and
    ``(a, b, 0)`` included."""
    return int(np.random.SeedSequence(_entropy(parts)).generate_state(1)[0])


def _read(urls: list[str], counts: list[int] | None, bad: BadLog, order: Iterator[int]) -> Iterator[dict[str, Any]]:
    """Raw samples from the shards ``order`` names. A shard that cannot be read to its
    end counts as the samples it lost (from ``counts``; at least one when unknown)."""
    empty = 0
    for index in order:
        got = 0
        try:
            for sample in iter_shard(urls[index]):
                got += 1
                yield sample
        except ShardReadError as e:
            lost = max(1, counts[index] - got) if counts is not None else 1
            bad.add(f"{urls[index]}#tail", urls[index],
                    f"{lost if counts is not None else 'some'} samples lost after sample {got}: {str(e).split(': ', 1)[-1]}", lost)
            if bad.stop:
                return
        empty = 0 if got else empty + 1
        if empty >= _MAX_EMPTY_SHARDS:
            bad.fatal = f"{_MAX_EMPTY_SHARDS} shards in a row gave no sample (the last: {urls[index]})"
            return


def read_range(urls: list[str], counts: list[int], lo: int, hi: int, bad: BadLog) -> Iterator[dict[str, Any]]:
    """Raw samples ``[lo, hi)`` of the shards ``urls`` read one after the other (``counts``
    samples each): a range may start or end inside a shard, so any number of readers can
    share any number of shards. Samples a shard cannot deliver are recorded as lost."""
    offset = 0
    for url, count in zip(urls, counts):
        start, offset = offset, offset + count
        if offset <= lo or start >= hi:
            continue
        seen, done, error = 0, False, "the shard holds fewer samples than dataset.json says"
        try:
            for j, sample in enumerate(iter_shard(url)):
                if start + j >= hi:
                    done = True
                    break
                seen = j + 1
                if start + j >= lo:
                    yield sample
            done = done or seen >= count
        except ShardReadError as e:
            error = str(e).split(": ", 1)[-1]
        if not done and start + seen < hi:
            # Keyed by shard: every reader (and every epoch) that meets the loss records the
            # same samples, counted once.
            bad.add(f"{url}#tail", url, f"{count - seen} samples lost from sample {seen} on: {error}", n=count - seen)


def _decode_or_log(sample: dict[str, Any], bad: BadLog) -> tuple[tv_tensors.Image, tv_tensors.Mask] | None:
    try:
        return decode_pair(sample)
    except ValueError as e:
        bad.add(f"{sample['__url__']}#{sample['__key__']}", f"{sample['__url__']} sample {sample['__key__']!r}", str(e))
        return None


# --- training -------------------------------------------------------------------------


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Batches each rank takes per epoch: the smallest rank's share of the split in whole
    batches, trimmed to whole optimiser steps of ``grad_accum`` batches. An epoch then
    visits every sample at most once and leaves out fewer than
    ``world_size * (batch_size * grad_accum + 1)`` of them."""
    per_rank = num_samples // world_size // batch_size // grad_accum * grad_accum
    if per_rank < 1:
        raise UnetsegError(
            f"{num_samples} training samples cannot give each of {world_size} process(es) a step of "
            f"{grad_accum} batch(es) of {batch_size}. Fix: lower --batch-size or --grad-accum, or use fewer processes"
        )
    return per_rank


class TrainStream(IterableDataset):
    """Endless, exact-epoch, shuffled training batches (see the module docstring)."""

    def __init__(
        self,
        source: Source,
        transform: TrainTransform,
        batch_size: int,
        *,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        max_bad_samples: int = DEFAULT_MAX_BAD_SAMPLES,
        augment_on: str = "workers",
    ):
        if not isinstance(transform, TrainTransform):
            raise TypeError("TrainStream takes a TrainTransform")
        if augment_on not in ("workers", "device"):
            raise ValueError(f"augment_on {augment_on!r}: expected 'workers' or 'device'")
        self.augment_on = augment_on
        self.source, self.transform, self.batch_size = source, transform, batch_size
        self.batches_per_epoch, self.rank, self.world_size = batches_per_epoch, rank, world_size
        self.seed, self.start_batch, self.shuffle_buffer = seed, start_batch, max(1, shuffle_buffer)
        self.max_bad_samples = max_bad_samples
        self.pad_label = source.info.classes.ignore_label
        if not source.urls or source.num_samples == 0:
            raise UnetsegError(f"{source.describe()} has no samples to train on. Fix: pack some into it, or pick "
                               "another split with --train-split")
        if source.counts is None:
            raise UnetsegError(f"{source.describe()}: the shards' sample counts are unknown, and an epoch needs them. "
                               "Fix: use shard names listed in dataset.json")
        if batches_per_epoch * batch_size > source.num_samples // world_size:
            raise UnetsegError(f"{batches_per_epoch} batches of {batch_size} per epoch on each of {world_size} "
                               f"process(es) need more than the {source.num_samples} samples of {source.describe()}. "
                               "Fix: use unetseg.stream.batches_per_epoch")

    def worker_range(self, epoch: int, worker: int, workers: int) -> tuple[list[int], list[tuple[int, int]]]:
        """The shard order of ``epoch`` and this worker's samples in it, as ``[lo, hi)``
        ranges: the rank's share of the split, cut in proportion to the batches each of the
        rank's workers serves (the DataLoader takes batches from its workers in turn). The
        shard order and a starting point are drawn per epoch, so the samples an epoch leaves
        out (fewer than a step's worth per rank) differ from epoch to epoch."""
        rng = random.Random(derive_seed(self.seed, epoch, 0))  # the same on every rank
        order = list(range(len(self.source.urls)))
        rng.shuffle(order)
        total = self.source.num_samples
        start = rng.randrange(total)
        rank_lo, _ = reader_range(total, self.rank, self.world_size)
        before = sum(len(range(w, self.batches_per_epoch, workers)) for w in range(worker))
        mine = len(range(worker, self.batches_per_epoch, workers))
        lo = (start + rank_lo + before * self.batch_size) % total
        hi = lo + mine * self.batch_size
        ranges = [(lo, min(hi, total))] + ([(0, hi - total)] if hi > total else [])
        return order, [(a, b) for a, b in ranges if b > a]

    def _samples(self, epoch: int, worker: int, workers: int, bad: BadLog) -> Iterator[dict[str, Any]]:
        """Raw samples of one worker's share of one epoch, shuffled through a buffer. When bad
        samples leave the share short, it is read again (a later pass, shuffled anew)."""
        order, ranges = self.worker_range(epoch, worker, workers)
        counts = [self.source.counts[i] for i in order]
        urls = [self.source.urls[i] for i in order]
        for cycle in range(1 << 30):
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, cycle))
            buffer: list[dict[str, Any]] = []
            got = 0
            for lo, hi in ranges:
                for sample in read_range(urls, counts, lo, hi, bad):
                    got += 1
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        i = rng.randrange(len(buffer))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield buffer.pop()
            rng.shuffle(buffer)
            yield from buffer
            if got == 0 or bad.stop:
                if not bad.stop and ranges:
                    bad.fatal = f"no sample of {self.source.describe()} could be read in epoch {epoch} ({ranges})"
                return

    def _batches(self, epoch: int, worker: int, workers: int, skip: int, bad: BadLog) -> Iterator[dict[str, Any]]:
        """This worker's batches of ``epoch``, from its ``skip``-th on (skipped samples are
        not decoded); it serves the rank's batches ``worker``, ``worker + workers``, ..."""
        images, masks, keys, params = [], [], [], []
        position = 0  # samples handed out (or skipped) so far: the place in the worker's share
        batch_index = worker + skip * workers  # the rank's batch being filled
        share = len(range(worker, self.batches_per_epoch, workers)) * self.batch_size
        misses = 0  # undecodable samples in a row: a whole pass of them means none will do
        for sample in self._samples(epoch, worker, workers, bad):
            if position < skip * self.batch_size:
                position += 1
                continue
            pair = _decode_or_log(sample, bad)
            if pair is None:
                misses += 1
                if misses > share and not bad.stop:
                    bad.fatal = f"no sample of {self.source.describe()} in this worker's share of epoch {epoch} decodes"
                if bad.stop:
                    yield bad.error_batch()
                    return
                continue
            misses = 0
            image, mask = pair
            # Each sample's parameters are drawn from its place in the epoch (rank, batch,
            # slot), so they do not depend on what was skipped or where it is augmented.
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, batch_index, len(images), 1))
            params.append(self.transform.draw(rng, *mask.shape[-2:]))
            position += 1
            images.append(image.as_subclass(torch.Tensor))
            masks.append(mask.as_subclass(torch.Tensor))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield bad.tag(self._batch(images, masks, torch.tensor(params, dtype=torch.float64), keys))
                images, masks, keys, params = [], [], [], []
                batch_index += workers
                if batch_index >= self.batches_per_epoch:
                    return
        if bad.stop:
            yield bad.error_batch()

    def _batch(self, images: list[torch.Tensor], masks: list[torch.Tensor], params: torch.Tensor,
               keys: list[str]) -> dict[str, Any]:
        if self.augment_on == "device":  # decoded samples and their parameters, augmented where they land
            image_batch, mask_batch = collate(images, masks, self.pad_label, torch.uint8)
            return {"image": image_batch, "mask": mask_batch, "aug": params, "keys": keys}
        image_batch, mask_batch = self.transform.apply_batch(images, masks, params)
        return {"image": image_batch, "mask": mask_batch, "keys": keys}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bad = BadLog(self.max_bad_samples)
        per_epoch = self.batches_per_epoch
        # The DataLoader takes batches from its workers in turn, so this worker serves
        # global batches start + worker, + workers, ... Batch b of epoch e is batch
        # (b - e*N) // workers of stream (b - e*N) % workers of that epoch.
        batch = self.start_batch + worker
        current, batches = None, iter(())
        while True:
            epoch, local = divmod(batch, per_epoch)
            if current != epoch:  # this worker's first batch of the epoch
                current, batches = epoch, self._batches(epoch, local % workers, workers, local // workers, bad)
            out = next(batches, None)
            if out is None:
                return  # only after an error batch: every epoch gives its batches
            yield out
            if "_error" in out:
                return
            batch += workers


# --- evaluation -----------------------------------------------------------------------


def reader_range(total: int, reader: int, readers: int) -> tuple[int, int]:
    """The contiguous sample range ``[lo, hi)`` of reader ``reader`` out of ``readers``."""
    return total * reader // readers, total * (reader + 1) // readers


class EvalStream(IterableDataset):
    """Every sample of a split exactly once over all ranks and workers, in batches that
    carry ``keys``, the original ``sizes`` and, when the transform resizes, ``full_mask``
    (the original masks, a list) for metrics at the original resolution."""

    def __init__(
        self,
        source: Source,
        transform: EvalTransform,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_bad_samples: int | None = DEFAULT_MAX_BAD_SAMPLES,
    ):
        if not isinstance(transform, EvalTransform):
            raise TypeError("EvalStream takes an EvalTransform: evaluation never augments")
        self.source, self.transform, self.batch_size = source, transform, batch_size
        self.rank, self.world_size, self.max_bad_samples = rank, world_size, max_bad_samples
        self.pad_label = source.info.classes.ignore_label

    def _my_samples(self, reader: int, readers: int, bad: BadLog) -> Iterator[dict[str, Any]]:
        urls, counts = self.source.urls, self.source.counts
        if counts is None:  # unknown sizes: deal whole shards
            yield from _read(urls, None, bad, iter(range(reader, len(urls), readers)))
            return
        lo, hi = reader_range(sum(counts), reader, readers)
        yield from read_range(urls, counts, lo, hi, bad)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bad = BadLog(self.max_bad_samples)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        resize = self.transform.resize is not None
        images, masks, full, keys, sizes = [], [], [], [], []

        def emit():
            image_batch, mask_batch = collate(images, masks, self.pad_label)
            batch = {"image": image_batch, "mask": mask_batch, "keys": list(keys), "sizes": list(sizes)}
            if resize:
                batch["full_mask"] = list(full)
            return bad.tag(batch)

        for sample in self._my_samples(reader, readers, bad):
            pair = _decode_or_log(sample, bad)
            if pair is None:
                continue
            image, mask = pair
            sizes.append(tuple(mask.shape))
            if resize:
                full.append(mask.to(torch.int64))
            image, mask = self.transform(image, mask)
            images.append(image)
            masks.append(mask)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield emit()
                images, masks, full, keys, sizes = [], [], [], [], []
            if bad.stop:
                yield bad.error_batch()
                return
        if images:
            yield emit()
        elif bad.unsent:
            yield bad.tag({"_empty": True})  # no batch left to carry the last bad samples
        if bad.stop:
            yield bad.error_batch()
