"""Shared fixtures: tiny folder datasets written on the fly, and the CamVid folder."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# For shell scripts under test: the venv's bin first, so they find its python and accelerate.
SCRIPT_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
              "OMP_NUM_THREADS": "1"}
CAMVID = REPO.parent / "shared" / "data" / "camvid"

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
NAMES = ["background", "red", "green", "blue"]
IGNORE = 255


@pytest.fixture
def camvid() -> Path:
    if not (CAMVID / "classes.json").is_file():
        pytest.skip(f"CamVid not found at {CAMVID} (it ships in ../shared/data/camvid beside the checkout)")
    return CAMVID


def write_classes(path: Path, names=NAMES, palette=PALETTE, ignore_index=IGNORE) -> Path:
    data = {"names": names, "palette": palette}
    if ignore_index is not None:
        data["ignore_index"] = ignore_index
    path.write_text(json.dumps(data))
    return path


def random_pair(rng: np.random.Generator, h: int, w: int, num_classes: int = 4, ignore: int | None = IGNORE):
    """An RGB image and a class-id mask of blocky regions, with some ignored pixels."""
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    coarse = rng.integers(0, num_classes, size=(h // 4 + 1, w // 4 + 1), dtype=np.uint8)
    mask = np.kron(coarse, np.ones((4, 4), dtype=np.uint8))[:h, :w].copy()
    if ignore is not None:
        mask[rng.random((h, w)) < 0.05] = ignore
    return image, mask


def encode_mask(mask: np.ndarray, encoding: str) -> Image.Image:
    """Write an id mask the way a user's files would hold it."""
    if encoding == "index":
        return Image.fromarray(mask, mode="L")
    if encoding == "index-p":
        img = Image.fromarray(mask, mode="P")
        img.putpalette([v for c in PALETTE for v in c] + [255, 255, 255] * 252)
        return img
    if encoding == "rgb":
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(PALETTE)] = PALETTE
        lut[IGNORE] = [1, 2, 3]  # a colour not in the palette
        return Image.fromarray(lut[mask], mode="RGB")
    if encoding == "binary":
        return Image.fromarray((mask == 1).astype(np.uint8) * 255, mode="L")
    raise ValueError(encoding)


def make_folders(
    root: Path,
    splits: dict[str, int] | None = None,
    *,
    size: tuple[int, int] = (24, 32),
    image_ext: str = ".png",
    mask_encoding: str = "index",
    num_classes: int = 4,
    seed: int = 0,
    ignore: int | None = IGNORE,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Write ``root/images/<split>/*`` and ``root/masks/<split>/*.png``; ``splits=None``
    writes one flat folder. Returns the pixels written, by split and stem."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for split, n in (splits or {"": 6}).items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"{split or 'img'}_{i:03d}"
            image, mask = random_pair(rng, *size, num_classes=2 if mask_encoding == "binary" else num_classes,
                                      ignore=None if mask_encoding == "binary" else ignore)
            Image.fromarray(image).save(root / "images" / split / f"{stem}{image_ext}")
            encode_mask(mask, mask_encoding).save(root / "masks" / split / f"{stem}.png")
            written.setdefault(split, {})[stem] = (image, mask)
    return written


def read_split(folder: Path, split: str) -> dict[str, dict]:
    """Every sample of a split as decoded arrays plus its json metadata, by key."""
    from unetseg.dataset import DatasetInfo
    from unetseg.imageio import decode_image, decode_mask
    from unetseg.shards import iter_shard

    samples = {}
    for shard in DatasetInfo.load(folder).splits[split].shards:
        for s in iter_shard(folder / shard):
            ext = "jpg" if "jpg" in s else "png"
            samples[s["__key__"]] = {
                "image": decode_image(s[ext]), "mask": decode_mask(s["mask.png"]), "ext": ext,
                "image_bytes": s[ext], "mask_bytes": s["mask.png"], "meta": json.loads(s["json"]),
            }
    return samples


def clashing_images(folder: Path) -> list[Path]:
    """Five small images whose names clash as prediction outputs (same stem, same stem in
    another folder, a stem that ends like an output suffix)."""
    rng = np.random.default_rng(2)
    paths = [folder / f for f in ["a/x.png", "b/x.png", "a/x.jpg", "a/x_color.png", "c/y.png"]]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return paths


def leftovers(parent: Path) -> list[str]:
    """Hidden partial folders a failed write could have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def corrupt(folder: Path, shard: str, which: int) -> str:
    """Replace the image of the ``which``-th sample of a shard with bytes that don't decode."""
    return replace_image(folder, shard, which, b"\xff\xd8 broken jpeg", "jpg")


def replace_image(folder: Path, shard: str, which: int, data: bytes, ext: str) -> str | None:
    """Put ``data`` (stored as ``KEY.ext``) in place of the JPEG image of the ``which``-th
    sample of a shard; returns that sample's key."""
    path = folder / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = None
    with tarfile.open(path, "w") as tar:
        for m, content in members:
            if m.name.endswith(".jpg"):
                if which == 0:
                    key = m.name.split(".")[0]
                    m.name, content = f"{key}.{ext}", data
                    m.size = len(content)
                which -= 1
            tar.addfile(m, io.BytesIO(content))
    return key


def train_tiny(data: Path, out: Path, *extra: str) -> Path:
    """``python -m unetseg.train`` of a tiny U-Net (width 4, depth 2, batch 4, crop 32, no
    tracker) on ``data`` into ``out``, in its own process; fails the test if it fails."""
    import subprocess

    cmd = [sys.executable, "-m", "unetseg.train", "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
           "--model-width", "4", "--model-depth", "2", "--num-workers", "0", "--tracker", "none", "--crop-size", "32",
           *map(str, extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def run_main(command: str, argv: list, capsys) -> tuple[int, str, str]:
    """``python -m unetseg.<command> ARGV`` in this process: (exit code, stdout, stderr).
    Fast (no interpreter start), and an unexpected exception fails the test with its
    traceback. Train's SIGTERM/SIGINT handlers are put back afterwards."""
    import signal

    from unetseg.evaluate import main as evaluate_main
    from unetseg.train import main as train_main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        {"train": train_main, "evaluate": evaluate_main}[command]([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- streams of tiny synthetic shard folders (test_stream.py, test_sources.py) --------------


def make(tmp_path: Path, name: str, train=13, val=13, size="24x24", **kw) -> Path:
    """A synthetic shard folder ``tmp_path/name``."""
    from unetseg.synth import synth

    synth(tmp_path / name, train=train, val=val, size=size, workers=1, progress=False, **kw)
    return tmp_path / name


def all_keys(folder: Path, split: str) -> list[str]:
    """The keys of a split, read straight from its shards."""
    from unetseg.dataset import DatasetInfo
    from unetseg.shards import iter_shard

    info = DatasetInfo.load(folder)
    return [s["__key__"] for n in info.splits[split].shards for s in iter_shard(folder / n)]


def eval_keys(source, workers=0, rank=0, world=1, resize=None) -> list[str]:
    """The keys an evaluation stream hands this rank, in order."""
    from unetseg.badsamples import StreamStats
    from unetseg.loaders import iterate, make_loader
    from unetseg.stream import EvalStream
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    stream = EvalStream(source, EvalTransform(EvalTransformConfig(resize=resize)), 3, rank=rank, world_size=world)
    return [k for b in iterate(make_loader(stream, workers), StreamStats()) for k in b["keys"]]


def train_stream(source, workers=0, start=0, seed=0, per_epoch=None, crop=16, stats=None, batch_size=3, **kw):
    """Batches of a training stream of ``source`` with small crops and a small buffer
    (``per_epoch``: default, the whole split's worth)."""
    from unetseg.badsamples import StreamStats
    from unetseg.loaders import iterate, make_loader
    from unetseg.stream import TrainStream, batches_per_epoch
    from unetseg.augment import TrainTransform, TrainTransformConfig

    if per_epoch is None:
        per_epoch = batches_per_epoch(source.num_samples, batch_size, kw.get("world_size", 1))

    t = TrainTransform(TrainTransformConfig(crop_size=crop, jitter=0.3), source.info.classes.ignore_label)
    stream = TrainStream(source, t, batch_size, batches_per_epoch=per_epoch, seed=seed, start_batch=start, shuffle_buffer=8,
                         **kw)
    return iterate(make_loader(stream, workers), stats or StreamStats(kw.get("max_bad_samples", 10)))


# --- images that say where their pixels came from (test_transforms.py, test_augment.py) ---


def coordinate_pair(h=40, w=50, num_classes=5):
    """An image whose pixels encode their own (y, x), a mask that is a function of (y, x),
    and a third channel of 255 that marks real (not padded) pixels."""
    import torch
    from torchvision import tv_tensors

    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([yy, xx, torch.full_like(yy, 255)]).to(torch.uint8)
    mask = ((yy * 7 + xx * 3) % num_classes).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def unnormalized(image):
    """Normalised-with-mean-0-std-1 pixels back to 0..255 integers."""
    import torch

    return (image * 255).round().to(torch.int64)


def direct_predictions(model_dir: Path, data: Path, split: str = "val"):
    """(key, target, prediction, num_classes, ignore_index) per sample of the split, each
    image run through the saved model here, without the stream, the scorer or the reducer."""
    import torch

    from unetseg.checkpoint import load_model
    from unetseg.dataset import DatasetInfo
    from unetseg.imageio import decode_image, decode_mask
    from unetseg.shards import iter_shard
    from unetseg.transforms import IMAGENET_MEAN, IMAGENET_STD

    model, _, info = load_model(model_dir)
    model.eval()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for shard in DatasetInfo.load(data).splits[split].shards:
        for s in iter_shard(data / shard):
            image = torch.from_numpy(decode_image(s["jpg"]).copy()).permute(2, 0, 1).float() / 255
            target = decode_mask(s["mask.png"]).astype(np.int64)
            with torch.no_grad():
                pred = model(((image - mean) / std)[None]).argmax(1)[0].numpy()
            yield s["__key__"], target, pred, info.num_classes, info.classes.ignore_index
