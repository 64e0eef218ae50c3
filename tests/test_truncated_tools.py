"""`unetseg shards preview` and `unetseg report --data` over a truncated shard: a clear
error for the preview, and for the report the samples it lost named on the page, never a
traceback. And their pictures of odd data (images far taller than wide) stay bounded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from unetseg.checkpoint import save_model
from unetseg.config import TrainConfig
from unetseg.dataset import DatasetInfo
from unetseg.errors import UnetsegError
from unetseg.models.unet import UNet, UNetConfig
from unetseg.synth import synth


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Val split of 6 samples in two shards of 3, the second cut in the middle."""
    folder = tmp_path_factory.mktemp("truncated") / "syn"
    synth(folder, train=2, val=6, size="24x32", shard_size=3, workers=1, progress=False)
    shard = folder / "val-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return folder


def fake_run(root: Path, shards: Path) -> Path:
    """A run dir with config.yaml, dataset.json and an untrained tiny best/ (no training)."""
    torch.manual_seed(0)
    run = root / "run"
    info = DatasetInfo.load(shards)
    net = UNet(UNetConfig(num_classes=info.num_classes, width=4, depth=2))
    config = TrainConfig()
    save_model(run / "best", net, {**config.to_dict(), "model": {"name": "unet", **net.config.to_dict()}}, info)
    (run / "config.yaml").write_text(config.to_yaml())
    shutil.copy(shards / "dataset.json", run / "dataset.json")
    return run


def test_preview_of_a_truncated_shard_names_it(tmp_path, shards):
    from unetseg.preview import preview

    with pytest.raises(UnetsegError, match=r"val-000001\.tar: unreadable after \d complete samples.*Fix: run "
                                           r"`unetseg shards verify`"):
        preview(shards, tmp_path / "p.png", split="val", n=6)
    assert not (tmp_path / "p.png").exists()
    # the 5 samples before the cut are shown: reading stops at the n-th, before the cut part
    assert preview(shards, tmp_path / "p.png", split="val", n=5).is_file()


def test_report_names_the_lost_samples_and_scores_the_rest(tmp_path, shards):
    from unetseg.report import report

    run = fake_run(tmp_path, shards)
    page = report(run, data=str(shards), out=tmp_path / "r.html", gallery=2).read_text()
    missing = page.split("<h2>Missing from this report</h2>")[1].split("<h2>")[0]
    assert re.search(r"\d samples of split &#x27;val&#x27; .* could not be read.*val-000001\.tar.*unetseg shards "
                     r"verify", missing), missing
    scored = int(re.search(r"\((\d+) images scored by this report\)", page).group(1))
    assert 3 <= scored < 6  # the first shard whole, the second up to the cut
    assert page.count("image mIoU <b>") == 4  # the gallery: 2 worst, 2 best


def test_report_leaves_out_a_jsonl_line_cut_short(tmp_path, shards):
    from unetseg.report import report

    run = fake_run(tmp_path, shards)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1, "images_per_s": 5.0}\n{"step": 2, "lo')
    page = report(run, data=str(shards), out=tmp_path / "r.html", gallery=0).read_text()
    assert "metrics.jsonl: 1 line(s) are not JSON records" in page
    assert "Training curves" in page  # the whole line before it is kept


def test_preview_of_tall_images_is_bounded(tmp_path):
    """1024x16 images gave a 1280 x 41020 px grid; now at most 32 inches (3200 px) a side."""
    from PIL import Image

    from unetseg import preview as module

    synth(tmp_path / "tall", train=4, val=1, size="1024x16", workers=1, progress=False)
    width, height = Image.open(module.preview(tmp_path / "tall", tmp_path / "p.png", n=4)).size
    assert width <= 3200 and height <= 3200
    assert module.grid_inches(2, 4, 32 / 40) == pytest.approx((12.8, 2 * (3.2 * 0.8 + 0.3)))  # ordinary: as before
    assert max(module.grid_inches(250, 4, 1.0)) == pytest.approx(32.0)  # --n 1000


def test_report_gallery_rows_of_tall_images_are_bounded():
    """A 1024x16 image was enlarged 10 times (a 760 x 10240 px row); rows now stay within
    480 pixels high."""
    import base64
    import io
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from unetseg.report import Scored, gallery_rows
    from unetseg.synth import synth_classes

    classes = synth_classes()
    heights = []
    for h, w in ((1024, 16), (24, 32), (3000, 4000)):
        item = Scored("k", 0.5, np.zeros((h, w), np.uint8), np.ones((h, w), np.uint8))
        row = gallery_rows([item], SimpleNamespace(urls=[]), classes)[0]  # not found again: a grey stand-in
        jpeg = base64.b64decode(row.split("base64,")[1].split('"')[0])
        heights.append(Image.open(io.BytesIO(jpeg)).size[1])
    assert heights[0] <= 480 and heights[1] == 24 * 5 and heights[2] <= 480  # small ones still enlarged
