"""unetseg synth: the embedded default dataset."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_split
from unetseg.dataset import DatasetInfo
from unetseg.errors import UnetsegError
from unetseg.pack import pack
from unetseg.synth import CLASS_NAMES, IGNORE_INDEX, synth


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    synth(tmp_path / "a", train=6, val=3, size="32x48", seed=5, shard_size=4, workers=1, progress=False)
    synth(tmp_path / "b", train=6, val=3, size="32x48", seed=5, shard_size=4, workers=2, progress=False)
    synth(tmp_path / "c", train=6, val=3, size="32x48", seed=6, shard_size=4, workers=1, progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert sorted(a) == ["dataset.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert a == b
    assert a["train-000000.tar"] != c["train-000000.tar"]


def test_classes_and_labels(tmp_path):
    info = synth(tmp_path / "s", train=40, val=0, size="64x64", workers=1, progress=False)
    assert info.classes.names == CLASS_NAMES and len(CLASS_NAMES) == 10
    assert info.classes.ignore_index == IGNORE_INDEX
    samples = read_split(tmp_path / "s", "train")
    labels = set()
    for s in samples.values():
        assert s["image"].shape == (64, 64, 3) and s["mask"].shape == (64, 64)
        labels |= set(np.unique(s["mask"]).tolist())
    assert labels == set(range(10)) | {IGNORE_INDEX}
    counts = sum(np.bincount(s["mask"].ravel(), minlength=256) for s in samples.values())
    assert info.splits["train"].pixel_counts == counts[:10].tolist()
    assert info.splits["train"].ignored_pixels == counts[IGNORE_INDEX]


def test_classes_share_one_colour_distribution(tmp_path):
    """Objects are told apart by shape: no class has a colour of its own."""
    synth(tmp_path / "s", train=1200, val=0, size="32x32", workers=2, progress=False)
    sums = np.zeros((10, 3))
    counts = np.zeros(10)
    for s in read_split(tmp_path / "s", "train").values():
        for k in range(1, 10):
            sel = s["mask"] == k
            sums[k] += s["image"][sel].sum(axis=0)
            counts[k] += sel.sum()
    means = sums[1:] / counts[1:, None]
    # Every class's mean colour sits near mid-grey, and they are close to each other
    # (each object has one colour; with ~260 objects per class the sampling spread of a
    # class mean is about 5, so these bounds sit near 5 and 4 of those spreads).
    assert np.abs(means - 127.5).max() < 25, means
    assert np.ptp(means, axis=0).max() < 30, means


def test_folders_then_pack_gives_the_same_samples_as_shards(tmp_path):
    synth(tmp_path / "direct", train=5, val=2, size="32x32", seed=2, workers=1, progress=False)
    synth(tmp_path / "f", train=5, val=2, size="32x32", seed=2, format="folders", workers=1, progress=False)
    info, _ = pack(tmp_path / "f" / "images", tmp_path / "f" / "masks", tmp_path / "f" / "classes.json",
                   tmp_path / "packed", seed=2, workers=1, progress=False)
    direct = DatasetInfo.load(tmp_path / "direct")
    assert info.classes == direct.classes
    for split in ("train", "val"):
        a, b = read_split(tmp_path / "direct", split), read_split(tmp_path / "packed", split)
        assert list(a) == list(b)  # same keys in the same shard order
        for key in a:
            assert a[key]["image_bytes"] == b[key]["image_bytes"]
            assert a[key]["mask_bytes"] == b[key]["mask_bytes"]
        assert info.splits[split].pixel_counts == direct.splits[split].pixel_counts


@pytest.mark.parametrize("bad", ["12x12", "axb", "1x2x3", "5000x64", "64,0"])
def test_bad_size(tmp_path, bad):
    with pytest.raises(UnetsegError, match=f"--size '{bad}'.*Fix:"):
        synth(tmp_path / "out", train=1, val=0, size=bad, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size, stored", [("96x128", "96x128"), ("96,128", "96x128"), ("64", "64x64"), (48, "48x48")])
def test_size_forms(tmp_path, size, stored):
    info = synth(tmp_path / "out", train=1, val=0, size=size, workers=1, progress=False)
    assert info.splits["train"].image_sizes == {stored: 1}
