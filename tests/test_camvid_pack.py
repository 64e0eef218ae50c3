"""Pack a small subset of the real CamVid data (skipped when ../shared is absent)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import read_split
from unetseg.pack import pack
from unetseg.shards import verify_shards


def test_pack_camvid_subset_pixel_counts(tmp_path, camvid):
    counts = {}
    for split, n in (("train", 6), ("val", 3)):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        total = np.zeros(256, dtype=np.int64)
        for image in sorted((camvid / "images" / split).glob("*.jpg"))[:n]:
            mask = camvid / "masks" / split / f"{image.stem}.png"
            (tmp_path / "images" / split / image.name).symlink_to(image)
            (tmp_path / "masks" / split / mask.name).symlink_to(mask)
            total += np.bincount(np.asarray(Image.open(mask)).ravel(), minlength=256)
        counts[split] = total
    info, _ = pack(tmp_path / "images", tmp_path / "masks", camvid / "classes.json", tmp_path / "out",
                   workers=2, progress=False)
    assert info.classes.ignore_index == 11 and info.num_classes == 11
    for split, n in (("train", 6), ("val", 3)):
        s = info.splits[split]
        assert s.num_samples == n and s.image_sizes == {"360x480": n}
        assert s.pixel_counts == counts[split][:11].tolist()
        assert s.ignored_pixels == counts[split][11]
        assert counts[split][12:].sum() == 0
        # JPEGs are kept byte for byte.
        for key, sample in read_split(tmp_path / "out", split).items():
            assert sample["image_bytes"] == (camvid / "images" / split / f"{key}.jpg").read_bytes()
    assert verify_shards(tmp_path / "out", progress=False) == []
