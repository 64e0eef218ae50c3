"""Where a split's shards are and what they hold: :class:`Source` and how to resolve one.

Owns turning what the user gave (``--data``, ``--val-data``, ``--dataset-json``) into the
list of shard URLs of one split, with their sample counts when dataset.json knows them.
Reading and batching those shards is :mod:`unetseg.stream`'s job; this module never
opens a shard, only dataset.json.

Sources
    A shard folder (local path or ``http(s)://`` base URL) with ``dataset.json``, or an
    explicit brace pattern / ``::``-separated list of shard URLs (local paths, ``http(s)://``,
    ``pipe:CMD``, and whatever else webdataset's ``gopen`` opens). For a pattern,
    ``dataset.json`` is looked up beside the first shard unless given, and says which
    split the pattern's shards belong to; the other splits' shards are found by the names
    dataset.json lists, in the same folder (:func:`sibling_split`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from unetseg.dataset import DATASET_JSON, DatasetInfo
from unetseg.errors import UnetsegError
from unetseg.shards import open_url


@dataclass
class Source:
    """The shards of one split, with their sample counts when known."""

    urls: list[str]
    counts: list[int] | None
    info: DatasetInfo
    split: str
    folder: str | None = None
    """The folder or base URL all ``urls`` are in (``None`` for ``pipe:`` commands or
    shards from several folders): where the other splits' shards are looked up."""

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    def describe(self) -> str:
        where = self.folder or " :: ".join(self.urls[:2]) + (" ..." if len(self.urls) > 2 else "")
        return f"split {self.split!r} of {where}"

    @property
    def splits(self) -> list[str]:
        """The dataset.json splits this source reads (several for ``train+val``)."""
        return self.split.split("+")

    def pixel_counts(self) -> list[int]:
        """Labelled pixels per class over the source's splits (from dataset.json)."""
        per_split = [self.info.split(name).pixel_counts for name in self.splits]
        return [sum(counts) for counts in zip(*per_split)]

    def image_sizes(self) -> dict[tuple[int, int], int]:
        """How many samples have each ``(H, W)`` size, over the source's splits."""
        sizes: dict[tuple[int, int], int] = {}
        for name in self.splits:
            for size, n in self.info.split(name).shapes().items():
                sizes[size] = sizes.get(size, 0) + n
        return sizes


def _is_remote(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def _join(base: str, name: str) -> str:
    # Not Path for URLs: it would collapse the "//" of "http://".
    return f"{base.rstrip('/')}/{name}" if _is_remote(base) else str(Path(base) / name)


def is_pattern(data: str | os.PathLike) -> bool:
    """Whether ``data`` names shards (a brace pattern, a ``.tar`` URL, a ``::`` list)
    rather than a shard folder."""
    text = str(data)
    return "{" in text or text.endswith(".tar") or "::" in text


def load_dataset_json(location: str | os.PathLike) -> DatasetInfo:
    """``dataset.json`` from a local folder or file, or from a URL."""
    text = str(location)
    if not _is_remote(text):
        return DatasetInfo.load(text)
    url = text if text.endswith(".json") else _join(text, DATASET_JSON)
    try:
        with open_url(url) as f:
            data = json.loads(f.read().decode("utf-8"))
    except Exception as e:
        raise UnetsegError(f"{url}: cannot read dataset.json ({e}). Fix: check the URL, or pass the file with --dataset-json") from None
    return DatasetInfo.from_dict(data, source=url)


def open_source(data: str | os.PathLike, split: str, dataset_json: str | os.PathLike | None = None) -> Source:
    """Resolve ``data`` (a shard folder or URL, or a shard pattern) to the shards of ``split``.

    A pattern names its shards itself; dataset.json says which split each belongs to, and
    a pattern whose shards dataset.json lists under another split is an error, so that
    training shards are never taken for validation ones. Shards that dataset.json does
    not list at all are taken as ``split`` with unknown sample counts."""
    from braceexpand import braceexpand

    text = str(data)
    if is_pattern(text):
        urls = [u for part in text.split("::") for u in braceexpand(part)]
        if urls[0].startswith("pipe:") and dataset_json is None:
            raise UnetsegError(f"{text}: a pipe: pattern has no folder to find dataset.json in. Fix: pass --dataset-json")
        folders = {u.rsplit("/", 1)[0] if "/" in u else "." for u in urls}
        folder = next(iter(folders)) if len(folders) == 1 and not urls[0].startswith("pipe:") else None
        location = dataset_json or _join(urls[0].rsplit("/", 1)[0] if "/" in urls[0] else ".", DATASET_JSON)
        info = load_dataset_json(location)
        info.split(split, source=str(location))
        owner = {name: name_split for name_split, s in info.splits.items() for name in s.shards}
        names = [u.rsplit("/", 1)[-1] for u in urls]
        found = sorted({owner[n] for n in names if n in owner})
        if found and found != [split]:
            others = [f"{n} ({owner[n]})" for n in names if owner.get(n, split) != split]
            raise UnetsegError(
                f"{text}: {location} lists {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} under another "
                f"split than {split!r}. Fix: give a pattern of the {split!r} shards only, or the shard folder itself"
                + (" (the other splits' shards are then found through dataset.json)" if split != "val" else "")
            )
        if found and not all(n in owner for n in names):
            missing = [n for n in names if n not in owner]
            raise UnetsegError(f"{text}: {location} does not list {missing[:3]}. Fix: check the pattern's shard numbers")
        s = info.splits[split]
        by_name = dict(zip(s.shards, s.shard_num_samples))
        counts = [by_name[n] for n in names] if found else None
        return Source(urls=urls, counts=counts, info=info, split=split, folder=folder)
    info = load_dataset_json(text)
    s = info.split(split, source=_join(text, DATASET_JSON))
    return Source(urls=[_join(text, n) for n in s.shards], counts=list(s.shard_num_samples), info=info, split=split,
                  folder=text)


def sibling_split(source: Source, split: str) -> Source:
    """The shards of another ``split`` of the dataset ``source`` comes from (the validation
    split of the training data): the names dataset.json lists for it, in ``source``'s
    folder. For a ``pipe:`` pattern or shards from several folders there is no such
    folder, and a dataset may have no such split: an error says to pass --val-data."""
    if source.folder is None:
        raise UnetsegError(
            f"{' :: '.join(source.urls[:2])}: cannot tell where the {split!r} shards are (the shards do not come from "
            f"one folder or URL). Fix: pass --val-data with the {split!r} shards (a folder or pattern)"
        )
    if split not in source.info.splits:  # "pick one of those" would lead to validating on training shards
        others = sorted(set(source.info.splits) - set(source.splits))
        raise UnetsegError(
            f"{source.folder}: no {split!r} split to validate on (dataset.json has {sorted(source.info.splits)}). Fix: "
            "pass --val-data with validation shards, or pack again with a validation split (a val/ subfolder of "
            "--images and --masks, or --val-fraction 0.1 for flat folders)"
            f"{f', or pass --val-split with one of {others}' if others else ''}"
        )
    s = source.info.split(split, source=_join(source.folder, DATASET_JSON))
    return Source(urls=[_join(source.folder, n) for n in s.shards], counts=list(s.shard_num_samples), info=source.info,
                  split=split, folder=source.folder)


def open_splits(data: str | os.PathLike, splits: str, dataset_json: str | os.PathLike | None = None) -> Source:
    """The shards of one split, or of several given as ``"train,val"`` (read one after the
    other, as one source named ``train+val``); several splits need a shard folder."""
    names = [name.strip() for name in str(splits).split(",")]
    if not all(names):
        raise UnetsegError(f"splits {splits!r}: a split name is empty. Fix: name the splits, e.g. train or train,val")
    if len(names) == 1:
        return open_source(data, names[0], dataset_json)
    if is_pattern(data):
        raise UnetsegError(f"{data}: a shard pattern names the shards of one split, not of {', '.join(names)}. "
                           "Fix: pass the shard folder with --data")
    if len(set(names)) != len(names):
        raise UnetsegError(f"splits {splits!r}: a split is named twice. Fix: name each once, e.g. train,val")
    parts = [open_source(data, name, dataset_json) for name in names]
    return Source(urls=[u for p in parts for u in p.urls], counts=[n for p in parts for n in p.counts],
                  info=parts[0].info, split="+".join(names), folder=parts[0].folder)
