"""WebDataset shard folders: the one writer behind ``pack`` and ``synth``, and the
``shards info`` / ``shards verify`` readers.

A shard folder holds ``{split}-000000.tar, {split}-000001.tar, ...`` and ``dataset.json``.
Each sample in a shard is three tar members sharing a key:

- ``KEY.jpg`` or ``KEY.png``: the image, as packed;
- ``KEY.mask.png``: an 8-bit single-channel PNG of class ids (``ignore_index`` kept);
- ``KEY.json``: ``{"key", "split", "height", "width", "source"}``.

Writing is all-or-nothing: shards go to a hidden temporary folder beside ``--out``
that is renamed into place only when every sample was good (or, with
``skip_invalid``, when the bad ones were skipped and reported).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

import unetseg
from unetseg.dataset import DATASET_JSON, ClassInfo, DatasetInfo, SplitInfo
from unetseg.errors import InputProblems, Problem, UnetsegError

DEFAULT_SHARD_SIZE = 64
IMAGE_EXTS = ("jpg", "png")
MASK_EXT = "mask.png"
META_EXT = "json"
# Fixed tar metadata so that the same samples give byte-identical shards.
_TAR_MTIME = 0
_TAR_OWNER = "unetseg"

T = TypeVar("T")


@dataclass
class EncodedSample:
    """One sample ready to be written: encoded bytes plus the statistics dataset.json keeps."""

    key: str
    image: bytes
    image_ext: str
    mask: bytes
    height: int
    width: int
    pixel_counts: np.ndarray
    """int64 labelled-pixel count per class."""
    ignored_pixels: int
    source: dict[str, str] = field(default_factory=dict)

    def tar_entries(self, split: str) -> dict[str, Any]:
        meta = {"key": self.key, "split": split, "height": self.height, "width": self.width, "source": self.source}
        return {
            "__key__": self.key,
            self.image_ext: self.image,
            MASK_EXT: self.mask,
            META_EXT: json.dumps(meta, sort_keys=True).encode(),
        }


# What a loader returns for one item: the sample, or every problem found in it.
LoadResult = EncodedSample | list[Problem]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def parallel_map(load: Callable[[T], LoadResult], items: Sequence[T], workers: int) -> Iterator[LoadResult]:
    """``map(load, items)`` in order, over ``workers`` processes when more than one."""
    if workers <= 1 or len(items) < 2:
        yield from map(load, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, min(16, len(items) // (4 * workers)))
        try:
            yield from pool.map(load, items, chunksize=chunk)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


class _SplitWriter:
    """Writes one split's samples into consecutive shards of ``shard_size`` samples."""

    def __init__(self, folder: Path, split: str, num_classes: int, shard_size: int):
        import webdataset as wds  # imported here: only writing needs it

        self._wds = wds
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.info = SplitInfo(
            num_samples=0, shards=[], shard_num_samples=[], pixel_counts=[0] * num_classes,
            ignored_pixels=0, image_sizes={},
        )
        self._pixels = np.zeros(num_classes, dtype=np.int64)
        self._sizes: Counter[str] = Counter()
        self._tar = None

    def write(self, sample: EncodedSample) -> None:
        if self._tar is None or self.info.shard_num_samples[-1] >= self.shard_size:
            self._close_shard()
            name = shard_name(self.split, len(self.info.shards))
            self._stream = open(self.folder / name, "wb")
            self._tar = self._wds.TarWriter(
                self._stream, user=_TAR_OWNER, group=_TAR_OWNER, mode=0o644, mtime=_TAR_MTIME, encoder=False
            )
            self.info.shards.append(name)
            self.info.shard_num_samples.append(0)
        self._tar.write(sample.tar_entries(self.split))
        self.info.shard_num_samples[-1] += 1
        self.info.num_samples += 1
        self._pixels += sample.pixel_counts
        self.info.ignored_pixels += int(sample.ignored_pixels)
        self._sizes[f"{sample.height}x{sample.width}"] += 1

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            self.info.num_bytes += (self.folder / self.info.shards[-1]).stat().st_size
            self._tar = None

    def finish(self) -> SplitInfo:
        self._close_shard()
        self.info.pixel_counts = [int(c) for c in self._pixels]
        self.info.image_sizes = dict(sorted(self._sizes.items(), key=lambda kv: (-kv[1], kv[0])))
        return self.info


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
    return progress, progress.add_task(description, total=total)


def write_dataset(
    out: str | os.PathLike,
    classes: ClassInfo,
    splits: dict[str, Sequence[T]],
    load: Callable[[T], LoadResult],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shuffle_seed: int | None = 0,
    workers: int = 1,
    skip_invalid: bool = False,
    overwrite: bool = False,
    problems: Iterable[Problem] = (),
    created_by: dict[str, Any] | None = None,
    progress: bool = True,
) -> DatasetInfo:
    """Load every item of every split through ``load`` and write the shard folder ``out``.

    ``problems`` are ones the caller found before loading (e.g. an image without a mask).
    Every problem is collected; unless ``skip_invalid``, any problem means nothing is
    left at ``out`` and :class:`InputProblems` lists them all. Items are written in a
    seeded shuffled order (``shuffle_seed=None`` keeps the given order), so shards mix
    samples that were neighbours on disk, and the same input gives the same bytes.
    """
    out = Path(out)
    if shard_size < 1:
        raise UnetsegError(f"--shard-size {shard_size}: must be at least 1. Fix: use e.g. {DEFAULT_SHARD_SIZE}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise UnetsegError(f"{out}: already exists. Fix: choose another --out, or pass --overwrite to replace it")
    found = list(problems)
    total = sum(len(items) for items in splits.values())
    if total == 0 and not found:
        found.append(Problem(str(out), "the input holds no samples", "point the command at folders with images and masks"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        infos: dict[str, SplitInfo] = {}
        bar, task = _progress(total, f"packing {out.name}", progress)
        with bar:
            for split, items in splits.items():
                order = list(items)
                if shuffle_seed is not None:
                    random.Random(f"{shuffle_seed}:{split}").shuffle(order)
                writer = _SplitWriter(tmp, split, classes.num_classes, shard_size)
                for result in parallel_map(load, order, workers):
                    if isinstance(result, EncodedSample):
                        # Once a problem is known and will abort the run, stop writing but
                        # keep checking, so the report lists every problem at once.
                        if skip_invalid or not found:
                            writer.write(result)
                    else:
                        found.extend(result)
                    bar.advance(task)
                infos[split] = writer.finish()
        if found and not skip_invalid:
            raise InputProblems(found, header=f"nothing was written to {out}; fix these problems, or pass --skip-invalid to leave the bad samples out")
        empty = [name for name, info in infos.items() if info.num_samples == 0]
        if empty:
            raise InputProblems(found, header=f"nothing was written to {out}: no valid sample is left in split(s) {empty}")
        info = DatasetInfo(
            classes=classes,
            splits=infos,
            created_by=created_by or {},
            skipped=[p.to_dict() for p in found],
            unetseg_version=unetseg.__version__,
        )
        (tmp / DATASET_JSON).write_text(info.to_json(), encoding="utf-8")
        replace_folder(tmp, out)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, out: Path) -> None:
    """Move the complete folder ``new`` to ``out``; an old ``out`` is removed only after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


class ShardReadError(Exception):
    """A shard that cannot be read to its end (truncated or not a tar file)."""


def open_url(url: str | os.PathLike):
    """A binary stream for a local path, ``file:``, ``http(s)://``, ``pipe:CMD`` or any
    other scheme webdataset's ``gopen`` handles."""
    text = str(url)
    if "://" not in text and not text.startswith("pipe:"):
        return open(text, "rb")
    from webdataset.gopen import gopen

    return gopen(text, "rb")


def iter_shard(url: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as ``{"__key__": key, "__url__": url, ext: bytes, ...}``.

    Raises :class:`ShardReadError` naming the shard and how many samples were read when
    it cannot be opened, is not a tar file, or ends early. A sample cut by the end of
    the file is not yielded.
    """
    count = 0
    sample: dict[str, Any] = {}
    try:
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if sample and key != sample["__key__"]:
                    yield sample
                    count += 1
                    sample = {}
                fileobj = tar.extractfile(member)
                data = fileobj.read() if fileobj else b""
                if len(data) != member.size:
                    # tarfile returns what is there; a short member means the file was cut.
                    raise EOFError(f"{member.name} has {len(data)} of its {member.size} bytes")
                sample.setdefault("__key__", key)
                sample.setdefault("__url__", str(url))
                sample[ext] = data
            # tarfile also stops quietly at a header cut short. A complete archive ends
            # with two zero blocks: tarfile has read the first, the second must follow.
            if len(tar.fileobj.read(tarfile.BLOCKSIZE)) < tarfile.BLOCKSIZE:
                raise EOFError("the file ends without the end-of-archive blocks")
    except Exception as e:  # any scheme's failure to open or read the shard (gopen pipes raise plain Exception)
        raise ShardReadError(f"{url}: unreadable after {count} complete samples ({type(e).__name__}: {e})") from None
    if sample:
        yield sample


def shards_info_table(info: DatasetInfo, folder: str | os.PathLike) -> list:
    """rich renderables summarising a shard folder: splits, then class frequencies."""
    from rich.table import Table

    splits = Table(title=f"{folder}: {info.num_classes} classes, ignore_index={info.classes.ignore_index}")
    for col in ("split", "samples", "shards", "size on disk", "image sizes", "ignored px"):
        splits.add_column(col, justify="left" if col in ("split", "image sizes") else "right")
    for name, s in info.splits.items():
        sizes = ", ".join(f"{k} ({v})" for k, v in list(s.image_sizes.items())[:3])
        if len(s.image_sizes) > 3:
            sizes += f", ... {len(s.image_sizes)} sizes"
        total = sum(s.pixel_counts) + s.ignored_pixels
        ignored = f"{100 * s.ignored_pixels / total:.1f}%" if total else "-"
        splits.add_row(name, str(s.num_samples), str(len(s.shards)), f"{s.num_bytes / 2**20:.1f} MiB", sizes, ignored)
    freq = Table(title="class frequency (share of labelled pixels)")
    freq.add_column("id", justify="right")
    freq.add_column("class")
    freq.add_column("colour")
    for name in info.splits:
        freq.add_column(name, justify="right")
    for i, (cname, colour) in enumerate(zip(info.classes.names, info.classes.palette)):
        r, g, b = colour
        row = [str(i), cname, f"[rgb({r},{g},{b})]██[/] {r},{g},{b}"]
        for s in info.splits.values():
            labelled = sum(s.pixel_counts)
            row.append(f"{100 * s.pixel_counts[i] / labelled:.2f}%" if labelled else "-")
        freq.add_row(*row)
    return [splits, freq]


def verify_shards(folder: str | os.PathLike, progress: bool = True) -> list[str]:
    """Decode every sample of a shard folder as training does and check it against ``dataset.json``.

    Returns one message per problem (empty when all is well): a missing or truncated
    shard, a sample count that differs, a sample without image or mask, an image or mask
    that does not decode or is not 8-bit, image and mask sizes that differ, a label id
    that is neither a class nor ``ignore_index``, and pixel counts or sizes that differ
    from ``dataset.json``.
    """
    folder = Path(folder)
    info = DatasetInfo.load(folder)
    valid = np.zeros(256, dtype=bool)
    valid[: info.num_classes] = True
    if info.classes.ignore_index is not None:
        valid[info.classes.ignore_index] = True
    errors: list[str] = []
    total = sum(s.num_samples for s in info.splits.values())
    bar, task = _progress(total, f"verifying {folder.name}", progress)
    with bar:
        for split, s in info.splits.items():
            pixels = np.zeros(256, dtype=np.int64)
            sizes: Counter[str] = Counter()
            seen = 0
            listed = set(s.shards)
            for extra in sorted(p.name for p in folder.glob(f"{split}-*.tar") if p.name not in listed):
                errors.append(f"{folder / extra}: shard not listed in dataset.json split {split!r}")
            for shard, expected in zip(s.shards, s.shard_num_samples):
                path = folder / shard
                if not path.is_file():
                    errors.append(f"{path}: shard listed in dataset.json is missing")
                    continue
                count = 0
                try:
                    for sample in iter_shard(path):
                        count += 1
                        bar.advance(task)
                        where = f"{path} sample {sample['__key__']!r}"
                        result = _check_sample(sample, valid)
                        if isinstance(result, str):
                            errors.append(f"{where}: {result}")
                            continue
                        counts, size = result
                        pixels += counts
                        sizes[size] += 1
                except ShardReadError as e:
                    errors.append(str(e))
                seen += count
                if count != expected:
                    errors.append(f"{path}: holds {count} samples, dataset.json says {expected}")
            if seen != s.num_samples:
                errors.append(f"split {split!r}: {seen} samples read, dataset.json says {s.num_samples}")
            if not errors:
                if [int(c) for c in pixels[: info.num_classes]] != s.pixel_counts:
                    errors.append(f"split {split!r}: pixel counts differ from dataset.json")
                if dict(sizes) != s.image_sizes:
                    errors.append(f"split {split!r}: image sizes differ from dataset.json")
    return errors


def _check_sample(sample: dict[str, Any], valid: np.ndarray) -> str | tuple[np.ndarray, str]:
    """Per-class pixel counts (ignore included) and ``"HxW"``, or what is wrong. Decoded by
    training's own :func:`~unetseg.stream.decode_pair`, so verify fails on every sample
    training would skip (a 16-bit image that Pillow would read as 8-bit, for one)."""
    from unetseg.stream import decode_pair  # imported here: torch is for verify, not for packing

    try:
        _, mask = decode_pair(sample)
    except ValueError as e:
        return str(e)
    mask = mask.numpy()
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        return f"label ids {bad.tolist()} are neither classes nor ignore_index"
    return counts, f"{mask.shape[0]}x{mask.shape[1]}"
