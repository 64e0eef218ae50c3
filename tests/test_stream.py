"""The streaming pipeline: exact-once evaluation, the training stream, bad data, the workers' signals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, all_keys, corrupt, eval_keys, make, train_stream
from multiproc import run_distributed
from unetseg.badsamples import StreamStats
from unetseg.dataset import DatasetInfo
from unetseg.errors import UnetsegError
from unetseg.shards import iter_shard, shard_name
from unetseg.sources import open_source
from unetseg.loaders import iterate, make_loader
from unetseg.stream import EvalStream, TrainStream, batches_per_epoch, reader_range
from unetseg.augment import TrainTransform, TrainTransformConfig
from unetseg.transforms import EvalTransform, EvalTransformConfig


def reshard(folder: Path, split: str, sizes: list[int]) -> None:
    """Rewrite a split's shards with the given sample counts (any layout a packer could make)."""
    import webdataset as wds

    info = DatasetInfo.load(folder)
    samples = [s for name in info.splits[split].shards for s in iter_shard(folder / name)]
    assert sum(sizes) == len(samples)
    for name in info.splits[split].shards:
        (folder / name).unlink()
    names, it = [], iter(samples)
    for i, size in enumerate(sizes):
        names.append(shard_name(split, i))
        with wds.TarWriter(str(folder / names[-1]), encoder=False) as tar:
            for _ in range(size):
                s = next(it)
                tar.write({k: v for k, v in s.items() if k != "__url__"})
    info.splits[split].shards, info.splits[split].shard_num_samples = names, sizes
    (folder / "dataset.json").write_text(info.to_json())


@pytest.mark.multiprocess
def test_exact_once_over_two_processes_any_shard_layout(tmp_path):
    folders = []
    for n_shards, sizes in ((1, [13]), (3, [5, 5, 3]), (8, [1, 1, 1, 1, 1, 1, 1, 6])):
        folder = make(tmp_path, f"s{n_shards}")
        reshard(folder, "val", sizes)
        reshard(folder, "train", sizes)
        for i, name in enumerate(DatasetInfo.load(folder).splits["val"].shards):
            shutil.copy(folder / name, folder / f"copy-{i:06d}.tar")  # a pattern whose sizes are unknown
        folders.append(folder)
    run_distributed([str(REPO / "tests" / "scripts" / "stream_worker.py"), str(tmp_path), *map(str, folders)], nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for folder in folders:
        expected = sorted(all_keys(folder, "val"))
        assert len(expected) == 13
        for workers in (0, 2):
            for counts in ("known", "unknown"):
                key = f"eval|{folder}|{workers}|{counts}"
                union = ranks[0][key] + ranks[1][key]
                assert sorted(union) == expected, (key, ranks[0][key], ranks[1][key])  # all, none twice
        for workers in (0, 2):
            train = [r[f"train|{folder}|{workers}"] for r in ranks]
            assert train[0]["per_epoch"] == train[1]["per_epoch"] == 3  # 13 // 2 ranks // batch 2
            assert len(train[0]["batches"]) == len(train[1]["batches"]) == 6
            epochs = [[k for r in train for b in r["batches"][e * 3:(e + 1) * 3] for k in b] for e in (0, 1)]
            for keys in epochs:  # every sample at most once per epoch, all but fewer than 2 x (2 + 1)
                assert len(keys) == len(set(keys)) == 12 and set(keys) <= set(all_keys(folder, "train"))
            assert epochs[0] != epochs[1]  # shuffled anew each epoch


@pytest.mark.parametrize("sizes", [[13], [5, 5, 3], [1, 1, 1, 1, 1, 1, 1, 6]], ids=["1 shard", "3 shards", "8 shards"])
def test_an_epoch_visits_every_sample_at_most_once_with_equal_batches_per_rank(tmp_path, sizes):
    """{1, 3, 8} shards x {1, 2} ranks x {0, 2} workers: the ranks' streams are built here
    (one TrainStream per rank, as each process builds its own); the 2-process test above
    runs two of these cases in real processes."""
    folder = make(tmp_path, "s", train=13, val=1)
    reshard(folder, "train", sizes)
    source = open_source(folder, "train")
    everything = set(all_keys(folder, "train"))
    for world in (1, 2):
        per_epoch = batches_per_epoch(source.num_samples, 2, world)
        assert per_epoch == 13 // world // 2
        for workers in (0, 2):
            streams = [train_stream(source, workers, per_epoch=per_epoch, batch_size=2, rank=r, world_size=world)
                       for r in range(world)]
            rank_batches = [[next(s)["keys"] for _ in range(3 * per_epoch)] for s in streams]  # three epochs
            epochs = []
            for e in range(3):
                keys = [k for batches in rank_batches for b in batches[e * per_epoch:(e + 1) * per_epoch] for k in b]
                assert len(keys) == len(set(keys)) == world * per_epoch * 2, (world, workers, e)  # none twice
                assert len(everything - set(keys)) < world * (2 + 1)  # all but fewer than a step per rank
                assert set(keys) <= everything
                epochs.append(keys)
            assert epochs[0] != epochs[1] != epochs[2]  # shuffled anew each epoch


def test_reader_ranges_tile_the_split():
    for total in (0, 1, 5, 13, 100):
        for readers in (1, 2, 3, 4, 16):
            ranges = [reader_range(total, r, readers) for r in range(readers)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_eval_stream_single_process_and_resize_carries_full_masks(tmp_path):
    folder = make(tmp_path, "s", val=7)
    source = open_source(folder, "val")
    assert sorted(eval_keys(source, workers=2)) == sorted(all_keys(folder, "val"))
    stream = EvalStream(source, EvalTransform(EvalTransformConfig(resize=16)), 4)
    batches = list(iterate(make_loader(stream), StreamStats()))
    assert [len(b["keys"]) for b in batches] == [4, 3]
    b = batches[0]
    assert b["image"].shape == (4, 3, 16, 16) and b["mask"].shape == (4, 16, 16)
    assert [tuple(m.shape) for m in b["full_mask"]] == [(24, 24)] * 4
    assert [tuple(s) for s in b["sizes"]] == [(24, 24)] * 4
    originals = {s["__key__"]: s for n in DatasetInfo.load(folder).splits["val"].shards for s in iter_shard(folder / n)}
    from unetseg.imageio import decode_mask

    for key, full in zip(b["keys"], b["full_mask"]):
        np.testing.assert_array_equal(full.numpy(), decode_mask(originals[key]["mask.png"]))


def test_eval_pads_mixed_sizes_with_ignore(tmp_path):
    a = make(tmp_path, "a", train=1, val=2, size="20x24")
    b = make(tmp_path, "b", train=1, val=1, size="16x30", seed=1)
    source = open_source(f"{a}/val-000000.tar::{b}/val-000000.tar", "val")
    stream = EvalStream(source, EvalTransform(EvalTransformConfig()), 3)
    (batch,) = list(iterate(make_loader(stream), StreamStats()))
    assert batch["image"].shape == (3, 3, 20, 30)
    assert [tuple(s) for s in batch["sizes"]] == [(20, 24), (20, 24), (16, 30)]
    assert (batch["mask"][0, :, 24:] == 255).all() and (batch["mask"][2, 16:, :] == 255).all()
    assert (batch["image"][2, :, 16:, :] == 0).all()


def test_train_stream_is_deterministic_and_resumes_at_any_batch(tmp_path):
    folder = make(tmp_path, "s", train=11, val=1)
    reshard(folder, "train", [4, 4, 3])
    source = open_source(folder, "train")
    for workers in (0, 2):
        straight = [next(it) for it in [train_stream(source, workers)] for _ in range(12)]
        again = train_stream(source, workers)
        for b in straight:
            nb = next(again)
            assert nb["keys"] == b["keys"] and torch.equal(nb["image"], b["image"]) and torch.equal(nb["mask"], b["mask"])
        for k in (2, 3, 7):  # mid-epoch, at an epoch boundary, in the third epoch (3 batches per epoch)
            resumed = train_stream(source, workers, start=k)
            for b in straight[k:]:
                nb = next(resumed)
                assert nb["keys"] == b["keys"], (workers, k)
                assert torch.equal(nb["image"], b["image"]) and torch.equal(nb["mask"], b["mask"])
    other = train_stream(source, 0, seed=1)
    assert [next(other)["keys"] for _ in range(5)] != [b["keys"] for b in straight[:5]]


def test_train_batches_have_the_crop_size_and_valid_labels(tmp_path):
    folder = make(tmp_path, "s", train=6, val=1)
    it = train_stream(open_source(folder, "train"), crop=32)  # larger than the 24x24 images: padded
    for _ in range(4):
        b = next(it)
        assert b["image"].shape == (3, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["mask"].dtype == torch.int64
        assert set(b["mask"].unique().tolist()) <= set(range(10)) | {255}


def test_corrupt_sample_is_skipped_counted_and_budget_stops(tmp_path):
    folder = make(tmp_path, "s", train=6, val=6)
    bad_key = corrupt(folder, "val-000000.tar", 2)
    train_bad_key = corrupt(folder, "train-000000.tar", 1)
    source = open_source(folder, "val")
    stats = StreamStats(max_bad_samples=3)
    stream = EvalStream(source, EvalTransform(EvalTransformConfig()), 4)
    keys = [k for b in iterate(make_loader(stream), stats) for k in b["keys"]]
    assert sorted(keys) == sorted(set(all_keys(folder, "val")) - {bad_key})
    assert stats.bad_samples == 1 and stats.reduce() == 1
    assert len(stats.problems()) == 1 and bad_key in stats.problems()[0]
    # The training stream reads the bad sample again in every epoch and in both workers,
    # skips it each time and counts it once.
    train_stats = StreamStats(max_bad_samples=1)
    it = train_stream(open_source(folder, "train"), workers=2, per_epoch=1, stats=train_stats, max_bad_samples=1)
    keys = [k for _ in range(10) for k in next(it)["keys"]]  # 10 epochs of one batch of 3
    assert len(keys) == 30 and train_bad_key not in keys and set(keys) == set(all_keys(folder, "train")) - {train_bad_key}
    assert train_stats.bad_samples == 1 and train_stats.reduce() == 1
    assert len(train_stats.problems()) == 1 and train_bad_key in train_stats.problems()[0]
    with pytest.raises(UnetsegError) as e:
        for _ in iterate(make_loader(EvalStream(source, EvalTransform(EvalTransformConfig()), 4)), StreamStats(0)):
            pass
    assert "val-000000.tar" in str(e.value) and "--max-bad-samples 0" in str(e.value) and "shards verify" in str(e.value)
    with pytest.raises(UnetsegError, match="train-000000.tar"):
        it = train_stream(open_source(folder, "train"), workers=2, max_bad_samples=0)
        for _ in range(10):
            next(it)


def test_truncated_shard_counts_its_missing_samples(tmp_path):
    folder = make(tmp_path, "s", train=2, val=8, shard_size=4)
    shard = folder / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    stats = StreamStats()
    keys = [k for b in iterate(make_loader(EvalStream(open_source(folder, "val"), EvalTransform(EvalTransformConfig()), 4)), stats)
            for k in b["keys"]]
    assert len(keys) + stats.bad_samples == 8 and stats.bad_samples >= 3
    assert len(stats.problems()) == 1 and "val-000001.tar" in stats.problems()[0]


def test_eval_stream_refuses_a_train_transform(tmp_path):
    folder = make(tmp_path, "s", train=1, val=1)
    source = open_source(folder, "val")
    with pytest.raises(TypeError):
        EvalStream(source, TrainTransform(TrainTransformConfig(), 255), 2)
    with pytest.raises(TypeError):
        TrainStream(source, EvalTransform(EvalTransformConfig()), 2, batches_per_epoch=1)


def test_a_truncated_training_shard_counts_the_samples_it_lost_once(tmp_path):
    folder = make(tmp_path, "s", train=12, val=1, shard_size=4)
    shard = folder / "train-000001.tar"
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) // 2])  # about half of its 4 samples are lost
    readable = len([s for s in _readable(shard)])
    assert 0 < readable < 4
    stats = StreamStats(max_bad_samples=4)
    it = train_stream(open_source(folder, "train"), workers=2, per_epoch=2, stats=stats, max_bad_samples=4)
    for _ in range(16):  # 8 epochs: the shard is read again and again
        next(it)
    assert stats.bad_samples == 4 - readable  # counted once, as the samples it lost
    assert len(stats.problems()) == 1 and "train-000001.tar" in stats.problems()[0]


def _readable(shard: Path):
    from unetseg.shards import ShardReadError

    try:
        yield from iter_shard(shard)
    except ShardReadError:
        return




def test_a_16_bit_mask_is_a_bad_sample_not_wrapped_labels():
    """Labels above 255 would wrap in the uint8 batches: such a mask is refused by name."""
    import io

    from PIL import Image

    from unetseg.stream import decode_pair

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    image = png(np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="16-bit"):
        decode_pair({"png": image, "mask.png": png(np.full((4, 5), 300, np.uint16))})
    assert decode_pair({"png": image, "mask.png": png(np.full((4, 5), 3, np.uint8))})[1].dtype == torch.uint8
