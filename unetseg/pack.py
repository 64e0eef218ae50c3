"""``unetseg pack``: folders of images and masks to WebDataset shards.

Pairing is by relative path without the extension (``train/a/0001.jpg`` with
``train/a/0001.png``). The top-level subfolders of ``--images`` and ``--masks`` name
the splits; a flat folder is one split, or two with ``val_fraction``.

Every input problem (a missing partner, an unreadable image, sizes that differ, a label
that is neither a class nor ``ignore_index``, ...) is collected and reported together;
nothing is left at the output unless ``skip_invalid`` (see :func:`unetseg.shards.write_dataset`).

Images are checked in their stored pixel order: EXIF orientation tags are not applied,
because masks are drawn on the stored pixels. Images and masks of more than 8 bits per
channel (16-bit PNG or TIFF, 32-bit integer or float TIFF) are problems like the others:
until 16 bits are supported end to end (issue 26), training would read them differently
from evaluation and prediction (:mod:`unetseg.imageio`).
"""

from __future__ import annotations

import functools
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from unetseg.dataset import SPLIT_NAME, ClassInfo, DatasetInfo
from unetseg.errors import Problem, UnetsegError
from unetseg.imageio import (
    IMAGE_DEPTH_FIX, KEPT_FORMATS, KEPT_MODES, MASK_DEPTH_FIX, BitDepthError, DecodeError, encode_jpeg, encode_png,
    open_fully, to_rgb_array,
)
from unetseg.shards import DEFAULT_SHARD_SIZE, EncodedSample, LoadResult, write_dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MASK_SUFFIXES = {".png"}
MaskEncoding = Literal["index", "rgb", "binary"]


@dataclass(frozen=True)
class Pair:
    key: str
    image: str
    mask: str


@dataclass(frozen=True)
class PackOptions:
    """How each pair is checked and encoded (picklable: it travels to worker processes)."""

    classes: ClassInfo
    mask_encoding: MaskEncoding = "index"
    unknown_color: Literal["error", "ignore"] = "error"
    image_format: Literal["keep", "jpg", "png"] = "keep"
    quality: int = 95
    max_size: int | None = None

    def check(self) -> None:
        n = self.classes.num_classes
        if self.mask_encoding not in ("index", "rgb", "binary"):
            raise UnetsegError(f"--mask-encoding {self.mask_encoding!r}: unknown. Fix: use index, rgb or binary")
        if self.mask_encoding == "binary" and n != 2:
            raise UnetsegError(
                f"--mask-encoding binary maps 0/255 masks to classes 0/1, but classes.json has {n} classes. "
                "Fix: list exactly two names (background first), or use --mask-encoding index"
            )
        if self.unknown_color == "ignore" and self.classes.ignore_index is None:
            raise UnetsegError(
                "--unknown-color ignore maps unknown colours to ignore_index, but classes.json sets none. "
                'Fix: add "ignore_index": 255 to classes.json'
            )
        if not 1 <= self.quality <= 100:
            raise UnetsegError(f"--quality {self.quality}: must be 1..100. Fix: use e.g. 95")
        if self.max_size is not None and self.max_size < 8:
            raise UnetsegError(f"--max-size {self.max_size}: too small. Fix: use at least 8, e.g. 512")


def _files(folder: Path, suffixes: set[str]) -> tuple[dict[str, Path], list[Path]]:
    """Files below ``folder`` by relative stem, and the files skipped for their suffix."""
    found: dict[str, list[Path]] = {}
    skipped = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() not in suffixes:
            skipped.append(path)
            continue
        found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return found, skipped


def _layout(folder: Path, role: str) -> tuple[list[str] | None, list[Problem]]:
    """Split names (subfolders), or None for a flat folder."""
    if not folder.is_dir():
        return None, [Problem(str(folder), f"the {role} folder does not exist", f"pass an existing folder to --{role}")]
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if subdirs and files:
        return None, [Problem(str(folder), f"holds both files and subfolders ({', '.join(subdirs)})",
                              "put every file in a split subfolder (train/, val/, ...), or use one flat folder")]
    for name in subdirs:
        if not SPLIT_NAME.match(name):
            return None, [Problem(str(folder / name), f"split name {name!r} has characters shard names can't hold",
                                  "rename the folder using letters, digits, '-' and '_'")]
    return (subdirs or None), []


def _key(stem: str) -> str:
    # WebDataset splits member names at the first dot, so keys hold no dots (or slashes).
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace("/", "__"))


def _pair(images: Path, masks: Path) -> tuple[list[Pair], list[Problem], list[Path]]:
    image_files, skipped = _files(images, IMAGE_SUFFIXES)
    mask_files, skipped_masks = _files(masks, MASK_SUFFIXES)
    problems = []
    pairs = []
    keys: dict[str, str] = {}
    for stem in sorted(set(image_files) | set(mask_files)):
        imgs, msks = image_files.get(stem, []), mask_files.get(stem, [])
        if len(imgs) > 1:
            problems.append(Problem(str(imgs[0]), f"several images share the stem {stem!r}: {[p.name for p in imgs]}",
                                    "keep one image per mask"))
            continue
        if not msks:
            problems.append(Problem(str(imgs[0]), f"image has no mask (looked for {masks / stem}.png)",
                                    "add the mask, or remove the image"))
            continue
        if not imgs:
            problems.append(Problem(str(msks[0]), "mask has no image (looked for "
                                    f"{images / stem}{{{','.join(sorted(IMAGE_SUFFIXES))}}})",
                                    "add the image, or remove the mask"))
            continue
        key = _key(stem)
        if key in keys:
            problems.append(Problem(str(imgs[0]), f"its sample key {key!r} is also the key of {keys[key]}",
                                    "rename one of the two files"))
            continue
        keys[key] = str(imgs[0])
        pairs.append(Pair(key=key, image=str(imgs[0]), mask=str(msks[0])))
    return pairs, problems, skipped + skipped_masks


def collect_pairs(
    images: str | os.PathLike, masks: str | os.PathLike, val_fraction: float | None = None, seed: int = 0
) -> tuple[dict[str, list[Pair]], list[Problem], list[Path]]:
    """Pairs per split, the problems found while pairing, and the files passed over."""
    images, masks = Path(images), Path(masks)
    if images.resolve() == masks.resolve():
        raise UnetsegError(f"--images and --masks are the same folder ({images}). Fix: keep masks in their own folder")
    img_splits, problems = _layout(images, "images")
    mask_splits, mask_problems = _layout(masks, "masks")
    problems += mask_problems
    if problems:
        return {}, problems, []
    if (img_splits is None) != (mask_splits is None):
        flat, nested = (images, masks) if img_splits is None else (masks, images)
        raise UnetsegError(f"{nested} has split subfolders but {flat} is flat. Fix: give both the same layout")
    splits: dict[str, list[Pair]] = {}
    skipped: list[Path] = []
    if img_splits is None:
        pairs, problems, skipped = _pair(images, masks)
        if val_fraction is None:
            splits["train"] = pairs
        else:
            if not 0 < val_fraction < 1:
                raise UnetsegError(f"--val-fraction {val_fraction}: must be between 0 and 1. Fix: use e.g. 0.1")
            order = list(pairs)
            random.Random(seed).shuffle(order)
            n_val = min(max(1, round(val_fraction * len(order))), len(order) - 1) if len(order) > 1 else 0
            val_keys = {p.key for p in order[:n_val]}
            splits["train"] = [p for p in pairs if p.key not in val_keys]
            splits["val"] = [p for p in pairs if p.key in val_keys]
        return splits, problems, skipped
    if val_fraction is not None:
        raise UnetsegError(
            f"--val-fraction splits a flat folder, but {images} already has splits {img_splits}. "
            "Fix: drop --val-fraction, or flatten the folders"
        )
    for name in sorted(set(img_splits) | set(mask_splits)):
        if name not in mask_splits:
            problems.append(Problem(str(images / name), "split has no mask folder", f"add {masks / name}/ or remove the split"))
            continue
        if name not in img_splits:
            problems.append(Problem(str(masks / name), "split has no image folder", f"add {images / name}/ or remove the split"))
            continue
        pairs, pair_problems, pair_skipped = _pair(images / name, masks / name)
        splits[name] = pairs
        problems += pair_problems
        skipped += pair_skipped
    return splits, problems, skipped


def _mask_ids(img: Image.Image, opts: PackOptions, path: str) -> tuple[np.ndarray | None, list[Problem]]:
    """Class ids (HxW uint8) from a decoded mask, per the mask encoding."""
    classes = opts.classes
    if opts.mask_encoding == "index":
        if img.mode in ("L", "P"):
            return np.asarray(img, dtype=np.uint8), []  # P: the palette indices are the ids
        hint = {"RGB": "if colours encode the classes, pass --mask-encoding rgb",
                "RGBA": "if colours encode the classes, pass --mask-encoding rgb",
                "1": "pass --mask-encoding binary"}.get(img.mode, "save the masks as 8-bit grayscale PNGs of class ids")
        return None, [Problem(path, f"mask mode is {img.mode}, not an 8-bit class-id PNG (L or P)", hint)]
    if opts.mask_encoding == "binary":
        values = np.asarray(img.convert("L"), dtype=np.uint8)
        odd = np.setdiff1d(np.unique(values), [0, 255])
        if odd.size:
            return None, [Problem(path, f"binary mask holds values {odd[:8].tolist()} besides 0 and 255",
                                  "threshold the masks to 0/255, or use --mask-encoding index")]
        return (values == 255).astype(np.uint8), []
    rgb = to_rgb_array(img).astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    lookup = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(classes.palette)}
    ids = np.array([lookup.get(int(c), -1) for c in colours], dtype=np.int32)
    unknown = colours[ids < 0]
    if unknown.size:
        if opts.unknown_color == "error":
            shown = [f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in unknown[:5].tolist()]
            more = f" and {unknown.size - 5} more" if unknown.size > 5 else ""
            return None, [Problem(path, f"colours not in the palette: {', '.join(shown)}{more}",
                                  "add them to the palette in classes.json, or pass --unknown-color ignore")]
        ids[ids < 0] = classes.ignore_index
    return ids[inverse.reshape(packed.shape)].astype(np.uint8), []


def load_pair(opts: PackOptions, pair: Pair) -> LoadResult:
    """Read, check and encode one pair; every problem found in it is returned."""
    problems: list[Problem] = []
    decoded = {}
    for role, path in (("image", pair.image), ("mask", pair.mask)):
        try:
            with open(path, "rb") as f:
                data = f.read()
            decoded[role] = (data, open_fully(data))
        except OSError as e:
            problems.append(Problem(path, f"cannot read the {role} ({e.strerror or e})", "check the file's permissions"))
        except BitDepthError as e:
            problems.append(Problem(path, f"the {role} holds {e}; unetseg packs 8-bit {role}s only",
                                    IMAGE_DEPTH_FIX if role == "image" else MASK_DEPTH_FIX))
        except DecodeError as e:
            problems.append(Problem(path, f"unreadable or truncated {role} ({e})",
                                    f"re-export the {role}, or remove the pair"))
    if problems:
        return problems
    image_bytes, image = decoded["image"]
    mask, problems = _mask_ids(decoded["mask"][1], opts, pair.mask)
    if mask is None:
        return problems
    width, height = image.size
    if (height, width) != mask.shape:
        return [Problem(pair.mask, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image} is {width}x{height} (WxH)",
                        "masks must match their image's size; re-export the mask")]
    counts = np.bincount(mask.ravel(), minlength=256)
    n, ignore = opts.classes.num_classes, opts.classes.ignore_index
    bad = [i for i in np.flatnonzero(counts).tolist() if i >= n and i != ignore]
    if bad:
        shown = ", ".join(f"{i} ({counts[i]} px)" for i in bad[:8])
        ignore_text = f"ignore_index {ignore}" if ignore is not None else "no ignore_index"
        return [Problem(pair.mask, f"label ids {shown} are neither classes (0..{n - 1}) nor ignore_index",
                        f"classes.json has {n} names and {ignore_text}: add the missing classes, set ignore_index, or fix the mask")]

    fmt = image.format
    resize = opts.max_size is not None and max(width, height) > opts.max_size
    if resize:
        scale = opts.max_size / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        counts = np.bincount(mask.ravel(), minlength=256)
    if opts.image_format == "keep" and not resize and fmt in KEPT_FORMATS and image.mode in KEPT_MODES:
        image_ext, encoded = KEPT_FORMATS[fmt], image_bytes
    else:
        target = opts.image_format if opts.image_format != "keep" else ("jpg" if fmt == "JPEG" else "png")
        pixels = to_rgb_array(image)
        image_ext = target
        encoded = encode_jpeg(pixels, opts.quality) if target == "jpg" else encode_png(pixels)
    return EncodedSample(
        key=pair.key,
        image=encoded,
        image_ext=image_ext,
        mask=encode_png(mask),
        height=height,
        width=width,
        pixel_counts=counts[:n].astype(np.int64),
        ignored_pixels=int(counts[ignore]) if ignore is not None else 0,
        source={"image": pair.image, "mask": pair.mask},
    )


def pack(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    classes: str | os.PathLike | ClassInfo,
    out: str | os.PathLike,
    *,
    mask_encoding: MaskEncoding = "index",
    unknown_color: Literal["error", "ignore"] = "error",
    val_fraction: float | None = None,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_format: Literal["keep", "jpg", "png"] = "keep",
    quality: int = 95,
    max_size: int | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[DatasetInfo, list[Path]]:
    """Pack folders of images and masks into shards at ``out``.

    Returns the written dataset description and the files passed over because their
    extension is not an image (or mask) one. Raises :class:`~unetseg.errors.InputProblems`
    with every problem found, leaving nothing at ``out``, unless ``skip_invalid``.
    """
    class_info = classes if isinstance(classes, ClassInfo) else ClassInfo.load(classes)
    opts = PackOptions(classes=class_info, mask_encoding=mask_encoding, unknown_color=unknown_color,
                       image_format=image_format, quality=quality, max_size=max_size)
    opts.check()
    splits, problems, passed_over = collect_pairs(images, masks, val_fraction, seed)
    args = {
        "images": str(images), "masks": str(masks), "classes": None if isinstance(classes, ClassInfo) else str(classes),
        "val_fraction": val_fraction, "seed": seed, "shard_size": shard_size, "skip_invalid": skip_invalid,
    } | {k: v for k, v in asdict(opts).items() if k != "classes"}
    info = write_dataset(
        out, class_info, splits, functools.partial(load_pair, opts),
        shard_size=shard_size, shuffle_seed=seed, workers=workers if workers is not None else (os.cpu_count() or 1),
        skip_invalid=skip_invalid, overwrite=overwrite, problems=problems,
        created_by={"command": "pack", "args": args}, progress=progress,
    )
    return info, passed_over
