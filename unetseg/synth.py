"""``unetseg synth``: the embedded default dataset, generated on the spot.

Ten classes: 0 is background, 1..9 are objects told apart by **shape** only. Every
colour, of objects and background alike, comes from one distribution shared by all
classes, so a model has to learn shape. Backgrounds are textured (two colours mixed by
smooth noise, often fine stripes, clutter lines) and grainy; objects are smoothly shaded,
vary in scale, position and a small rotation, and overlap and occlude each other; the
image gets a little blur and noise. Telling object from background is a local matter
(grain against smooth shading), telling the objects apart is not: a first attempt with
textured objects on textured backgrounds (figure from ground by closure alone) was not
learned by a small U-Net in the minutes a CPU demo has. As in PASCAL VOC, a one-pixel
band along each object's outline is marked ``ignore_index`` (255): after blurring,
those pixels are ambiguous.

Each sample draws from its own generator seeded by ``(seed, split, index)``, so the same
seed gives the same bytes whatever the number of worker processes.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

from unetseg.dataset import ClassInfo, DatasetInfo, dumps_json
from unetseg.errors import UnetsegError
from unetseg.imageio import encode_jpeg, encode_png
from unetseg.options import size_pair
from unetseg.shards import DEFAULT_SHARD_SIZE, EncodedSample, parallel_map, replace_folder, write_dataset

CLASS_NAMES = ["background", "disk", "square", "triangle", "ring", "plus", "star", "crescent", "bar", "ell"]
PALETTE = [
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
]
IGNORE_INDEX = 255
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
JPEG_QUALITY = 90


def synth_classes() -> ClassInfo:
    return ClassInfo(names=list(CLASS_NAMES), palette=[list(c) for c in PALETTE], ignore_index=IGNORE_INDEX)


def _shape(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean footprint of shape ``kind`` in unit coordinates (the shape spans about [-1, 1])."""
    r = np.hypot(u, v)
    if kind == 1:  # disk
        return r <= 1.0
    if kind == 2:  # square
        return np.maximum(abs(u), abs(v)) <= 0.8
    if kind == 3:  # triangle, apex up
        return (v <= 0.6) & (v >= -0.9 + 1.76 * abs(u))
    if kind == 4:  # ring
        return (r <= 1.0) & (r >= 0.55)
    if kind == 5:  # plus
        return ((abs(u) <= 0.28) & (abs(v) <= 0.95)) | ((abs(v) <= 0.28) & (abs(u) <= 0.95))
    if kind == 6:  # five-pointed star
        theta = np.arctan2(v, u)
        return r <= 0.42 + 0.58 * ((np.cos(5 * theta) + 1) / 2) ** 2
    if kind == 7:  # crescent
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
    if kind == 8:  # bar (a long ellipse)
        return (u / 1.0) ** 2 + (v / 0.33) ** 2 <= 1.0
    if kind == 9:  # the letter L
        return ((u >= -0.8) & (u <= -0.3) & (abs(v) <= 0.9)) | ((abs(u) <= 0.8) & (v >= 0.4) & (v <= 0.9))
    raise ValueError(f"unknown shape {kind}")


def _colour(rng: np.random.Generator) -> np.ndarray:
    """One colour from the distribution shared by every class and the background."""
    return rng.uniform(0, 255, size=3)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(0, 1, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float background: two shared-distribution colours mixed by smooth noise,
    often with fine stripes (a grain is added after the blur, see :func:`render`)."""
    a, b = _colour(rng), _colour(rng)
    mix = _smooth_noise(rng, h, w, cell=int(rng.integers(6, 24)))
    if rng.random() < 0.5:
        period, angle = rng.uniform(3, 7), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)
        mix = 0.6 * mix + 0.4 * stripes
    return a * (1 - mix[..., None]) + b * mix[..., None]


def _fill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float object fill: one shared-distribution colour with a gentle linear shading."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.normal(size=2)
    ramp = (yy * direction[0] + xx * direction[1]) / (np.hypot(*direction) * max(h, w))
    return _colour(rng) + ramp[..., None] * rng.uniform(-60, 60, size=3)


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (HxWx3 uint8) and its mask (HxW uint8)."""
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Background clutter: thin lines in shared-distribution colours, labelled background.
    for _ in range(int(rng.integers(0, 5))):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * max(height, width)
        dist = abs((xx - width / 2) * np.sin(angle) - (yy - height / 2) * np.cos(angle) - offset)
        image[dist <= rng.uniform(0.5, 2.0)] = _colour(rng)
    side = min(height, width)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(1, len(CLASS_NAMES)))
        size = rng.uniform(0.15, 0.3) * side
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        angle = rng.uniform(-0.2, 0.2)
        du, dv = (xx - cx) / size, (yy - cy) / size
        u = du * np.cos(angle) + dv * np.sin(angle)
        v = -du * np.sin(angle) + dv * np.cos(angle)
        footprint = _shape(kind, u, v)
        if not footprint.any():
            continue
        image[footprint] = _fill(rng, height, width)[footprint]
        mask[footprint] = kind
    pixels = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    pixels = np.asarray(pixels.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8)))), dtype=np.float32)
    # Background pixels carry a strong grain, objects are smooth: whether a pixel belongs to
    # an object is visible locally, which object it is takes its shape. Then a little
    # noise everywhere.
    grain = rng.normal(0, rng.uniform(15, 30), size=pixels.shape) * (mask == 0)[..., None]
    pixels = np.clip(pixels + grain + rng.normal(0, rng.uniform(2, 5), size=pixels.shape), 0, 255).astype(np.uint8)
    # Pixels on an outline (a 4-neighbour with another label) are ambiguous after blurring.
    edge = np.zeros_like(mask, dtype=bool)
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    mask[edge] = IGNORE_INDEX
    return pixels, mask


@dataclass(frozen=True)
class SynthSpec:
    seed: int
    height: int
    width: int


def make_sample(spec: SynthSpec, item: tuple[str, int]) -> EncodedSample:
    split, index = item
    rng = np.random.default_rng([spec.seed, SPLIT_IDS.get(split, 3), index])
    image, mask = render(rng, spec.height, spec.width)
    counts = np.bincount(mask.ravel(), minlength=256)
    return EncodedSample(
        key=sample_key(split, index),
        image=encode_jpeg(image, JPEG_QUALITY),
        image_ext="jpg",
        mask=encode_png(mask),
        height=spec.height,
        width=spec.width,
        pixel_counts=counts[: len(CLASS_NAMES)].astype(np.int64),
        ignored_pixels=int(counts[IGNORE_INDEX]),
        source={"synth": f"seed={spec.seed} split={split} index={index}"},
    )


def sample_key(split: str, index: int) -> str:
    return f"synth-{split}-{index:06d}"


# A render needs room for its shapes and its outline band; beyond this it is slow for no gain.
SIDES = (16, 4096)


def synth(
    out: str | os.PathLike,
    *,
    train: int = 2048,
    val: int = 256,
    size: str | int | tuple[int, int] = "64x64",
    seed: int = 0,
    format: Literal["shards", "folders"] = "shards",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> DatasetInfo | Path:
    """Write the synthetic dataset to ``out`` as shards (returns the dataset description)
    or as ``images/``, ``masks/`` and ``classes.json`` that ``unetseg pack`` accepts."""
    pair = size_pair(size, "--size", smallest=SIDES[0], largest=SIDES[1])
    if pair is None:
        raise UnetsegError("--size: none given. Fix: use e.g. 64x64")
    height, width = pair
    if train < 1 or val < 0:
        raise UnetsegError(f"--train {train} --val {val}: need at least one train sample. Fix: use e.g. --train 512 --val 128")
    spec = SynthSpec(seed=seed, height=height, width=width)
    splits = {"train": [("train", i) for i in range(train)]}
    if val:
        splits["val"] = [("val", i) for i in range(val)]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    make = functools.partial(make_sample, spec)
    args = {"train": train, "val": val, "size": f"{height}x{width}", "seed": seed}
    if format == "shards":
        return write_dataset(
            out, synth_classes(), splits, make, shard_size=shard_size, shuffle_seed=seed, workers=workers,
            overwrite=overwrite, created_by={"command": "synth", "args": args}, progress=progress,
        )
    if format != "folders":
        raise UnetsegError(f"--format {format!r}: unknown. Fix: use shards or folders")
    return _write_folders(Path(out), splits, make, workers, overwrite)


def _write_folders(out: Path, splits: dict, make, workers: int, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UnetsegError(f"{out}: already exists. Fix: choose another --out, or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split, items in splits.items():
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "masks" / split).mkdir(parents=True)
            for sample in parallel_map(make, items, workers):
                (tmp / "images" / split / f"{sample.key}.{sample.image_ext}").write_bytes(sample.image)
                (tmp / "masks" / split / f"{sample.key}.png").write_bytes(sample.mask)
        (tmp / "classes.json").write_text(dumps_json(synth_classes().to_dict()), encoding="utf-8")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
