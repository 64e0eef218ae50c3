"""unetseg pack: pairing, encodings, round trip, determinism, and every bad-input case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import NAMES, PALETTE, leftovers, make_folders, read_split, write_classes
from unetseg.dataset import DatasetInfo
from unetseg.errors import InputProblems, UnetsegError
from unetseg.pack import pack


def run_pack(tmp_path, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    classes = kw.pop("classes", None) or write_classes(tmp_path / "classes.json")
    return pack(tmp_path / "images", tmp_path / "masks", classes, tmp_path / "out", **kw)


@pytest.mark.parametrize("encoding", ["index", "index-p", "rgb", "binary"])
def test_round_trip_each_mask_encoding(tmp_path, encoding):
    written = make_folders(tmp_path, {"train": 5, "val": 3}, mask_encoding=encoding)
    kw = {}
    if encoding == "rgb":
        kw["mask_encoding"], kw["unknown_color"] = "rgb", "ignore"
    elif encoding == "binary":
        kw["mask_encoding"] = "binary"
        write_classes(tmp_path / "classes.json", names=NAMES[:2], palette=PALETTE[:2], ignore_index=None)
    else:
        kw["mask_encoding"] = "index"
    info, _ = run_pack(tmp_path, classes=tmp_path / "classes.json" if encoding == "binary" else None, **kw)
    assert {name: s.num_samples for name, s in info.splits.items()} == {"train": 5, "val": 3}
    for split, pairs in written.items():
        samples = read_split(tmp_path / "out", split)
        assert sorted(samples) == sorted(pairs)
        counts = np.zeros(info.num_classes, dtype=np.int64)
        for stem, (image, mask) in pairs.items():
            got = samples[stem]
            np.testing.assert_array_equal(got["image"], image)  # PNG in, PNG kept: exact
            np.testing.assert_array_equal(got["mask"], mask)  # masks always exact
            assert got["ext"] == "png"
            counts += np.bincount(mask.ravel(), minlength=256)[: info.num_classes]
        assert info.splits[split].pixel_counts == counts.tolist()
    # What was written is what dataset.json on disk says.
    assert DatasetInfo.load(tmp_path / "out").to_dict() == info.to_dict()


def test_jpeg_images_keep_their_bytes_and_bmp_tiff_become_lossless_png(tmp_path):
    make_folders(tmp_path, {"train": 2}, image_ext=".jpg")
    rng = np.random.default_rng(1)
    for ext in (".bmp", ".tif"):
        image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / "train" / f"x{ext[1:]}{ext}")
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "masks" / "train" / f"x{ext[1:]}.png")
    run_pack(tmp_path)
    samples = read_split(tmp_path / "out", "train")
    for stem in ("train_000", "train_001"):
        assert samples[stem]["ext"] == "jpg"
        assert samples[stem]["image_bytes"] == (tmp_path / "images" / "train" / f"{stem}.jpg").read_bytes()
    for ext in ("bmp", "tif"):
        original = np.asarray(Image.open(tmp_path / "images" / "train" / f"x{ext}.{ext}").convert("RGB"))
        assert samples[f"x{ext}"]["ext"] == "png"
        np.testing.assert_array_equal(samples[f"x{ext}"]["image"], original)


def test_reencode_and_max_size_downscale_masks_with_nearest(tmp_path):
    written = make_folders(tmp_path, {"train": 3}, size=(40, 60))
    info, _ = run_pack(tmp_path, image_format="jpg", quality=80, max_size=30)
    samples = read_split(tmp_path / "out", "train")
    assert info.splits["train"].image_sizes == {"20x30": 3}
    for stem, (_, mask) in written["train"].items():
        got = samples[stem]
        assert got["ext"] == "jpg" and got["image"].shape == (20, 30, 3) and got["mask"].shape == (20, 30)
        # Nearest neighbour never invents a label: every value is one the input had.
        assert set(np.unique(got["mask"])) <= set(np.unique(mask))
        expected = np.asarray(Image.fromarray(mask).resize((30, 20), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(got["mask"], expected)
    counts = sum(np.bincount(s["mask"].ravel(), minlength=256)[:4] for s in samples.values())
    assert info.splits["train"].pixel_counts == counts.tolist()


def test_shard_size_and_names(tmp_path):
    make_folders(tmp_path, {"train": 10})
    info, _ = run_pack(tmp_path, shard_size=4)
    split = info.splits["train"]
    assert split.shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert split.shard_num_samples == [4, 4, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset.json", *split.shards]


def test_packing_twice_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    make_folders(tmp_path, {"train": 9, "val": 4}, image_ext=".jpg")
    classes = write_classes(tmp_path / "classes.json")
    outs = []
    for i, workers in enumerate((1, 2)):
        out = tmp_path / f"out{i}"
        pack(tmp_path / "images", tmp_path / "masks", classes, out, shard_size=4, workers=workers, progress=False)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_flat_folder_with_seeded_val_fraction(tmp_path):
    make_folders(tmp_path, None)  # 6 flat pairs
    classes = write_classes(tmp_path / "classes.json")
    splits = []
    for i, seed in enumerate((3, 3, 4)):
        info, _ = pack(tmp_path / "images", tmp_path / "masks", classes, tmp_path / f"o{i}",
                       val_fraction=0.34, seed=seed, workers=1, progress=False)
        splits.append({name: set(read_split(tmp_path / f"o{i}", name)) for name in info.splits})
    assert set(splits[0]) == {"train", "val"}
    assert len(splits[0]["val"]) == 2 and len(splits[0]["train"]) == 4
    assert not splits[0]["val"] & splits[0]["train"]
    assert splits[0] == splits[1]  # same seed, same split
    assert splits[0] != splits[2]  # another seed draws another split
    # Without --val-fraction a flat folder is one split called train.
    info, _ = pack(tmp_path / "images", tmp_path / "masks", classes, tmp_path / "flat", workers=1, progress=False)
    assert list(info.splits) == ["train"] and info.splits["train"].num_samples == 6


def test_nested_folders_inside_a_split_pair_by_relative_path(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "images" / "train" / sub).mkdir(parents=True)
        (tmp_path / "masks" / "train" / sub).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "images" / "train" / sub / "0.png")
        Image.fromarray(np.full((8, 8), 1 if sub == "a" else 2, np.uint8)).save(tmp_path / "masks" / "train" / sub / "0.png")
    run_pack(tmp_path)
    samples = read_split(tmp_path / "out", "train")
    assert set(samples) == {"a__0", "b__0"}
    assert samples["a__0"]["mask"].max() == 1 and samples["b__0"]["mask"].max() == 2


# --- bad input: every problem named, collected, and nothing left behind -------------


def assert_fails_cleanly(tmp_path, expected: list[str], **kw) -> InputProblems:
    with pytest.raises(InputProblems) as e:
        run_pack(tmp_path, **kw)
    message = str(e.value)
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    assert all("Fix:" in str(p) for p in e.value.problems)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    return e.value


def test_image_without_mask_and_mask_without_image(tmp_path):
    make_folders(tmp_path, {"train": 3})
    (tmp_path / "masks" / "train" / "train_001.png").unlink()
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "masks" / "train" / "orphan.png")
    err = assert_fails_cleanly(tmp_path, ["train_001.png", "image has no mask", "orphan.png", "mask has no image"])
    assert len(err.problems) == 2


def test_truncated_and_unreadable_images(tmp_path):
    make_folders(tmp_path, {"train": 3}, image_ext=".jpg")
    path = tmp_path / "images" / "train" / "train_000.jpg"
    path.write_bytes(path.read_bytes()[:300])
    (tmp_path / "images" / "train" / "train_002.jpg").write_bytes(b"not an image at all")
    assert_fails_cleanly(tmp_path, ["train_000.jpg", "train_002.jpg", "unreadable or truncated image"])


def test_sizes_that_differ(tmp_path):
    make_folders(tmp_path, {"train": 2})
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(tmp_path / "masks" / "train" / "train_001.png")
    assert_fails_cleanly(tmp_path, ["train_001.png", "mask is 32x20", "is 32x24"])


def test_label_that_is_neither_class_nor_ignore(tmp_path):
    make_folders(tmp_path, {"train": 2})
    mask = np.zeros((24, 32), np.uint8)
    mask[0, :3] = 7
    Image.fromarray(mask).save(tmp_path / "masks" / "train" / "train_000.png")
    assert_fails_cleanly(tmp_path, ["train_000.png", "label ids 7 (3 px)", "0..3"])


def test_rgb_mask_with_a_colour_not_in_the_palette(tmp_path):
    make_folders(tmp_path, {"train": 2}, mask_encoding="rgb")
    assert_fails_cleanly(tmp_path, ["colours not in the palette: (1,2,3)", "--unknown-color ignore"], mask_encoding="rgb")


def test_rgb_mask_with_index_encoding_suggests_rgb(tmp_path):
    make_folders(tmp_path, {"train": 1}, mask_encoding="rgb")
    assert_fails_cleanly(tmp_path, ["mask mode is RGB", "--mask-encoding rgb"])


def test_empty_input(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    assert_fails_cleanly(tmp_path, ["no samples"])


def test_all_problems_are_reported_together(tmp_path):
    make_folders(tmp_path, {"train": 4, "val": 2})
    (tmp_path / "masks" / "train" / "train_000.png").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "train" / "train_002.png")
    (tmp_path / "images" / "val" / "val_001.png").write_bytes(b"\x89PNG broken")
    err = assert_fails_cleanly(tmp_path, ["train_000.png", "train_002.png", "val_001.png"])
    assert len(err.problems) == 3


def test_skip_invalid_writes_the_good_pairs_and_reports_the_bad(tmp_path):
    written = make_folders(tmp_path, {"train": 4})
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "train" / "train_002.png")
    info, _ = run_pack(tmp_path, skip_invalid=True)
    assert set(read_split(tmp_path / "out", "train")) == set(written["train"]) - {"train_002"}
    assert len(info.skipped) == 1 and "train_002.png" in info.skipped[0]["path"]
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["skipped"] == info.skipped


def test_existing_output_needs_overwrite(tmp_path):
    make_folders(tmp_path, {"train": 2})
    run_pack(tmp_path)
    before = (tmp_path / "out" / "dataset.json").read_bytes()
    with pytest.raises(UnetsegError, match="--overwrite"):
        run_pack(tmp_path)
    assert (tmp_path / "out" / "dataset.json").read_bytes() == before
    run_pack(tmp_path, overwrite=True, shard_size=1)
    assert DatasetInfo.load(tmp_path / "out").splits["train"].shards == ["train-000000.tar", "train-000001.tar"]
    assert leftovers(tmp_path) == []
