"""``unetseg shards preview``: a grid of samples with their masks overlaid in the palette,
as packed or after the training augmentation, to see that packing and augmentation did
what was meant before spending GPU hours.

Each tile is the image with the mask blended over it (``alpha``); ignored pixels (and the
padding of an augmented crop) are left unblended, and the tile's title is the sample's
key. With ``augmented``, each sample goes through the training augmentation of
``config`` (the defaults, or a training YAML's ``data`` section) with per-sample
parameters drawn as the training stream draws them for epoch 0.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np

from unetseg.errors import UnetsegError


def _samples(source, n: int):
    """The first ``n`` (key, image, mask) of the split. A sample that does not decode, or a
    shard that cannot be read up to the ``n``-th, stops the preview with the shard's name:
    a grid that quietly left samples out would hide the packing problem it is there to show."""
    from unetseg.shards import ShardReadError, iter_shard
    from unetseg.stream import decode_pair

    for url in source.urls:
        try:
            for sample in iter_shard(url):
                try:
                    image, mask = decode_pair(sample)
                except ValueError as e:
                    raise UnetsegError(f"{url} sample {sample['__key__']!r}: {e}. Fix: run `unetseg shards verify`") from None
                yield sample["__key__"], image, mask
                n -= 1
                if n == 0:  # before reading on: a shard cut after the last sample shown is no concern here
                    return
        except ShardReadError as e:
            raise UnetsegError(f"{e}. Fix: run `unetseg shards verify` on the shard folder and re-pack the shards "
                               "it names, or preview fewer samples (--n) or another --split") from None


def _augment(config, source, pairs):
    """Each (key, image, mask) through the training augmentation, back to uint8 for display."""
    import torch

    from unetseg.stream import derive_seed
    from unetseg.train_data import train_transform

    tf = train_transform(config, source)
    mean, std = torch.tensor(tf.config.mean).view(3, 1, 1), torch.tensor(tf.config.std).view(3, 1, 1)
    for i, (key, image, mask) in enumerate(pairs):
        x, m = tf(image, mask, random.Random(derive_seed(config.run.seed, 0, 0, i, 0, 1)))
        pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        yield key, pixels, m


def grid_inches(rows: int, cols: int, aspect: float, tile: float = 3.2, most: float = 32.0) -> tuple[float, float]:
    """The grid's figure size: ``tile``-inch-wide tiles (plus a title line each), shrunk
    so that neither side passes ``most`` inches. Uncapped, a long ``--n`` or images far
    taller than wide (1024x16 gave a 1280 x 41020 px PNG) grew the PNG without bound; the
    tile's shape is kept within 1:8..8:1 (imshow letterboxes the image inside it)."""
    width, height = tile * cols, (tile * min(8.0, max(0.125, aspect)) + 0.3) * rows
    shrink = min(1.0, most / max(width, height))
    return width * shrink, height * shrink


def preview(folder: str | os.PathLike, out: str | os.PathLike, split: str = "train", n: int = 16,
            augmented: bool = False, config_path: str | os.PathLike | None = None, alpha: float = 0.5) -> Path:
    """Write the grid to ``out`` (PNG, written whole or not at all); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unetseg.checkpoint import write_bytes_atomic
    from unetseg.flags import build_config
    from unetseg.sources import open_source

    if n < 1:
        raise UnetsegError(f"--n {n}: must be at least 1. Fix: use e.g. --n 16")
    if not 0 <= alpha <= 1:
        raise UnetsegError(f"--alpha {alpha}: must be between 0 and 1. Fix: use e.g. 0.5")
    source = open_source(folder, split)
    classes = source.info.classes
    config = build_config(str(config_path) if config_path else None, {})
    pairs = list(_samples(source, n))
    if not pairs:
        raise UnetsegError(f"{source.describe()} has no samples. Fix: pick another --split")
    if augmented:
        pairs = list(_augment(config, source, pairs))
    lut = classes.palette_lut().astype(np.float32)
    cols = min(4, len(pairs))
    rows = -(-len(pairs) // cols)
    height, width = pairs[0][1].shape[-2:]
    fig, axes = plt.subplots(rows, cols, figsize=grid_inches(rows, cols, height / width), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (key, image, mask) in zip(axes.flat, pairs):
        rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
        labels = mask.numpy().astype(np.int64)
        labelled = (labels < classes.num_classes)[..., None]  # ignored and padded pixels stay as they are
        tile = np.where(labelled, (1 - alpha) * rgb + alpha * lut[labels.clip(0, 255)], rgb)
        ax.imshow(tile.round().clip(0, 255).astype(np.uint8))
        ax.set_title(str(key), fontsize=8)
    fig.suptitle(f"{source.describe()}" + (" after the training augmentation" if augmented else ""), fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, buffer.getvalue())
    return out
