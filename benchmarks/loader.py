"""Training-stream throughput against a notebook-style loader, side by side.

    python benchmarks/loader.py --data shards/camvid

Four loaders with the same workers, batch size, crop size and augmentation settings
(random scale 0.75-1.5, crop, flip, colour jitter 0.3, normalisation):

- ``stream``: unetseg's training stream over the shards, augmenting in the workers
  (``augment_on: workers``; crop first, then resize only the crop);
- ``device_feed``: the stream as it feeds ``augment_on: device``: workers decode and draw
  the parameters, the augmentation itself is left to the GPU (not timed here);
- ``baseline``: what a notebook does: a map-style Dataset that opens the original image
  and mask files with PIL and augments with a torchvision v2 pipeline (resize the whole
  frame, then crop; shuffled DataLoader);
- ``decode_only``: the training stream with no augmentation (decode, crop to the same
  size, convert and normalise): the ceiling for this data on this machine.

Also times single-image decoding with torchvision.io and with PIL, which is how the
stream's decoder was chosen. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from unetseg.badsamples import StreamStats
from unetseg.shards import iter_shard
from unetseg.sources import open_source
from unetseg.loaders import iterate, make_loader
from unetseg.stream import TrainStream, batches_per_epoch, collate, decode_pair
from unetseg.augment import TrainTransform, TrainTransformConfig


class FilesDataset(Dataset):
    """What a notebook does: list the image files, open each pair with PIL."""

    def __init__(self, images: Path, masks: Path, transform):
        self.images = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.masks, self.transform = masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        path = self.images[i]
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        mask = torch.from_numpy(np.array(Image.open(self.masks / f"{path.stem}.png")))
        return self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))


def notebook_transform(crop: int, scale: tuple[float, float], short_side: int, ignore: int) -> v2.Compose:
    """The usual v2 recipe: scale the whole frame (shorter side drawn from the range), crop,
    flip, jitter, normalise; one call transforms image and mask together."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore}
    return v2.Compose([
        v2.RandomResize(round(short_side * scale[0]), round(short_side * scale[1]) + 1, antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill=fill),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def rate(batches, batch_size: int, num: int, warmup: int) -> float:
    """Samples per second over ``num`` batches after ``warmup`` (worker start-up excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(num):
        next(it)
    return num * batch_size / (time.perf_counter() - start)


def endless(loader):
    while True:
        yield from loader


def decode_rates(folder: str, split: str, n: int = 60) -> tuple[float, float]:
    source = open_source(folder, split)
    samples = [s for _, s in zip(range(n), iter_shard(source.urls[0]))]
    torch.set_num_threads(1)
    timings = {}
    for name, fn in (
        ("tvio", decode_pair),
        ("pil", lambda s: (np.asarray(Image.open(io.BytesIO(s["jpg" if "jpg" in s else "png"])).convert("RGB")),
                           np.asarray(Image.open(io.BytesIO(s["mask.png"]))))),
    ):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            for s in samples:
                fn(s)
            runs.append(len(samples) / (time.perf_counter() - start))
        timings[name] = statistics.median(runs)
    torch.set_num_threads(os.cpu_count() or 1)
    return timings["tvio"], timings["pil"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="shards/camvid", help="shard folder (packed from folders that still exist)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", help="original image folder of the split (default: from dataset.json)")
    parser.add_argument("--masks", help="original mask folder of the split (default: from dataset.json)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()

    source = open_source(args.data, args.split)
    packed_from = source.info.created_by.get("args", {})
    images = Path(args.images or Path(packed_from.get("images", "")) / args.split)
    masks = Path(args.masks or Path(packed_from.get("masks", "")) / args.split)
    if not images.is_dir() or not masks.is_dir():
        raise SystemExit(f"original files not found at {images} / {masks}: pass --images and --masks")
    ignore = source.info.classes.ignore_label
    scale = (0.75, 1.5)
    augment = TrainTransform(TrainTransformConfig(crop_size=args.crop_size, scale_range=scale, jitter=0.3), ignore)
    short_side = min(int(v) for v in max(source.info.split(args.split).image_sizes.items(), key=lambda kv: kv[1])[0].split("x"))
    notebook = notebook_transform(args.crop_size, scale, short_side, 255 if ignore is None else ignore)
    # Same output size as the augmented stream (a crop is a slice), nothing random else.
    plain = TrainTransform(TrainTransformConfig(crop_size=args.crop_size, scale_range=(1.0, 1.0), hflip=False), ignore)
    per_epoch = batches_per_epoch(source.num_samples, args.batch_size, 1)
    common = dict(batches_per_epoch=per_epoch, seed=0)
    bs, n, w = args.batch_size, args.batches, args.warmup

    results = {}
    stream = make_loader(TrainStream(source, augment, bs, **common), args.workers)
    results["stream"] = rate(iterate(stream, StreamStats()), bs, n, w)
    feed = make_loader(TrainStream(source, augment, bs, augment_on="device", **common), args.workers)
    results["device_feed"] = rate(iterate(feed, StreamStats()), bs, n, w)
    baseline = DataLoader(
        FilesDataset(images, masks, notebook), batch_size=bs, shuffle=True, num_workers=args.workers, drop_last=True,
        collate_fn=lambda items: collate([i for i, _ in items], [m for _, m in items], 255 if ignore is None else ignore),
        persistent_workers=args.workers > 0,
    )
    results["baseline"] = rate(endless(baseline), bs, n, w)
    decode = make_loader(TrainStream(source, plain, bs, **common), args.workers)
    results["decode_only"] = rate(iterate(decode, StreamStats()), bs, n, w)
    tvio, pil = decode_rates(args.data, args.split)

    print(f"data {args.data} ({args.split}), workers {args.workers}, batch {bs}, crop {args.crop_size}, {n} timed batches")
    print(f"{'loader':<34}{'samples/s':>10}{'vs baseline':>13}")
    labels = {"stream": "unetseg stream (decode + augment)", "device_feed": "unetseg stream feeding device aug",
              "baseline": "PIL files + v2 (notebook)", "decode_only": "unetseg stream, decode + crop only"}
    for key, label in labels.items():
        print(f"{label:<34}{results[key]:>10.1f}{results[key] / results['baseline']:>12.2f}x")
    print(f"augmenting stream / decode only: {results['stream'] / results['decode_only']:.2f}")
    print(f"single-thread decode of image+mask: torchvision.io {tvio:.0f}/s, PIL {pil:.0f}/s ({tvio / pil:.2f}x)")
    print(json.dumps({
        "samples_per_s": round(results["stream"], 2),
        "device_feed_samples_per_s": round(results["device_feed"], 2),
        "baseline_samples_per_s": round(results["baseline"], 2),
        "decode_only_samples_per_s": round(results["decode_only"], 2),
        "tvio_decode_per_s": round(tvio, 1),
        "pil_decode_per_s": round(pil, 1),
        "workers": args.workers, "batch_size": bs, "crop_size": args.crop_size,
    }))


if __name__ == "__main__":
    main()
