"""The description of a shard folder: classes (``classes.json``) and ``dataset.json``.

``classes.json`` is what a user writes by hand::

    {"names": ["sky", "road", ...], "palette": [[128, 128, 128], ...], "ignore_index": 255}

``palette`` is optional (a distinct default is generated) and so is ``ignore_index``
(no pixel is ignored). ``dataset.json`` is what ``unetseg pack`` and ``unetseg synth``
write beside the shards; everything that reads shards starts from it.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unetseg.errors import UnetsegError
from unetseg.options import size_pair

DATASET_JSON = "dataset.json"
FORMAT_NAME = "unetseg-shards"
FORMAT_VERSION = 1
# Masks are stored as 8-bit PNGs, so class ids and the ignore index must fit in a byte.
MAX_LABEL = 255
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def dumps_json(data: Any) -> str:
    """Indented JSON with lists of numbers kept on one line (palettes, counts)."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s+([-\d.eE+,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def default_palette(n: int) -> list[list[int]]:
    """``n`` distinct, reproducible colours: hues spaced by the golden ratio."""
    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
        colours.append([round(r * 255), round(g * 255), round(b * 255)])
    return colours


@dataclass(frozen=True)
class ClassInfo:
    """Class names, one RGB colour per class, and the label id that marks ignored pixels."""

    names: list[str]
    palette: list[list[int]]
    ignore_index: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def ignore_label(self) -> int:
        """The label of pixels that no loss or metric counts: ``ignore_index``, or
        ``MAX_LABEL`` (255) when the dataset has none. Padding (crops larger than the
        image, batches of mixed sizes) carries it too. 255 is never a class id: masks
        are 8-bit and there are at most 255 classes."""
        return MAX_LABEL if self.ignore_index is None else self.ignore_index

    def palette_lut(self):
        """A 256x3 uint8 lookup table from label to colour: the palette, and black for the
        labels above the classes (255 among them)."""
        import numpy as np

        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "classes") -> ClassInfo:
        """Validate a parsed ``classes.json``; errors name ``source``, the value and the fix."""

        def fail(what: str, fix: str) -> UnetsegError:
            return UnetsegError(f"{source}: {what}. Fix: {fix}")

        example = '{"names": ["background", "road"], "palette": [[0, 0, 0], [128, 64, 128]], "ignore_index": 255}'
        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, found {type(data).__name__}", f"write it like {example}")
        unknown = sorted(set(data) - {"names", "palette", "ignore_index"})
        if unknown:
            raise fail(f"unknown keys {unknown}", 'use only "names", "palette" and "ignore_index"')
        names = data.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise fail(f'"names" must be a non-empty list of non-empty strings, found {names!r}', f"write it like {example}")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise fail(f"class names repeat: {dupes}", "give every class a distinct name")
        if len(names) > MAX_LABEL:
            raise fail(f"{len(names)} classes, more than the {MAX_LABEL} that 8-bit masks can hold", "merge classes")
        palette = data.get("palette")
        if palette is None:
            palette = default_palette(len(names))
        ok = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not ok:
            raise fail(f'"palette" must be a list of [r, g, b] lists of integers 0..255, found {palette!r}', f"write it like {example}")
        if len(palette) != len(names):
            raise fail(f'"palette" has {len(palette)} colours for {len(names)} names', "give exactly one colour per class, in the order of names")
        if len({tuple(c) for c in palette}) != len(palette):
            raise fail("two classes share a colour in \"palette\"", "give every class a distinct colour (rgb masks are decoded through it)")
        ignore = data.get("ignore_index")
        if ignore is not None:
            if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= MAX_LABEL:
                raise fail(f'"ignore_index" must be an integer 0..{MAX_LABEL}, found {ignore!r}', "use e.g. 255, or leave it out")
            if ignore < len(names):
                raise fail(
                    f'"ignore_index" {ignore} is also the id of class {names[ignore]!r}',
                    f"use an id of {len(names)} or more (e.g. 255), or drop that class from names",
                )
        return cls(names=list(names), palette=[list(c) for c in palette], ignore_index=ignore)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassInfo:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnetsegError(f"{path}: no such file. Fix: pass the path of your classes.json to --classes") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnetsegError(f"{path}: not valid JSON ({e}). Fix: correct the file's syntax") from None
        return cls.from_dict(data, source=str(path))


@dataclass
class SplitInfo:
    """What one split of a shard folder holds."""

    num_samples: int
    shards: list[str]
    shard_num_samples: list[int]
    pixel_counts: list[int]
    """Labelled pixels per class; ignored pixels are counted in ``ignored_pixels``."""
    ignored_pixels: int
    image_sizes: dict[str, int]
    """How many samples have each size, keyed ``"HxW"``."""
    num_bytes: int = 0

    def shapes(self) -> dict[tuple[int, int], int]:
        """``image_sizes`` keyed ``(H, W)``: how many samples have each size."""
        return {size_pair(key, "dataset.json image size"): n for key, n in self.image_sizes.items()}


@dataclass
class DatasetInfo:
    """The contents of ``dataset.json``."""

    classes: ClassInfo
    splits: dict[str, SplitInfo]
    created_by: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unetseg_version: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "unetseg_version": self.unetseg_version,
            "classes": self.classes.to_dict(),
            "splits": {name: asdict(split) for name, split in self.splits.items()},
            "created_by": self.created_by,
            "skipped": self.skipped,
        }

    def to_json(self) -> str:
        return dumps_json(self.to_dict())

    def split(self, name: str, source: str = DATASET_JSON) -> SplitInfo:
        if name not in self.splits:
            raise UnetsegError(f"{source}: no split {name!r}; it has {sorted(self.splits)}. Fix: pick one of those")
        return self.splits[name]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DatasetInfo:
        """Read ``folder/dataset.json`` (or the file itself if a file is given)."""
        path = Path(folder)
        if path.suffix != ".json":
            path = path / DATASET_JSON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnetsegError(
                f"{path}: no such file. Fix: pass a folder written by `unetseg pack` or `unetseg synth`"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnetsegError(f"{path}: not valid JSON ({e}). Fix: re-run `unetseg pack`") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = DATASET_JSON) -> DatasetInfo:
        """Validate parsed ``dataset.json`` content; ``source`` names it in errors."""
        path = source
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise UnetsegError(f"{path}: not an unetseg dataset.json. Fix: re-run `unetseg pack`")
        version = data.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise UnetsegError(f"{path}: format_version {version!r} is not a whole number. Fix: re-run `unetseg pack`")
        if version > FORMAT_VERSION:
            raise UnetsegError(
                f"{path}: format version {data['format_version']} is newer than this unetseg "
                f"understands ({FORMAT_VERSION}). Fix: upgrade unetseg"
            )
        try:
            splits = {name: SplitInfo(**split) for name, split in data["splits"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise UnetsegError(f"{path}: malformed splits ({e}). Fix: re-run `unetseg pack`") from None
        for name, split in splits.items():
            shards, counts = split.shards, split.shard_num_samples
            if not (isinstance(shards, list) and all(isinstance(n, str) for n in shards)
                    and isinstance(counts, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in counts)
                    and len(shards) == len(counts)):
                raise UnetsegError(f"{path}: split {name!r} needs a list of shard names and a list of as many sample "
                                   f"counts, found {shards!r} and {counts!r}. Fix: re-run `unetseg pack`")
        return cls(
            classes=ClassInfo.from_dict(data.get("classes"), source=f"{path} (classes)"),
            splits=splits,
            created_by=data.get("created_by", {}),
            skipped=data.get("skipped", []),
            unetseg_version=data.get("unetseg_version", ""),
            format=data["format"],
            format_version=data.get("format_version", FORMAT_VERSION),
        )
