"""Which files ``unetseg predict`` reads and which file names it writes.

Kept apart from the model and the pixels (:mod:`unetseg.predict`) because every rule here
is decided before a model is loaded or an image decoded: a typo in an input or an output
that would clobber an input is an error before anything is written.

**Inputs** (:func:`collect_inputs`): files, folders and glob patterns, in the order
given, each file once. A folder contributes the image files directly inside it
(jpg, jpeg, png, bmp, tif, tiff, webp, any case; not its subfolders, not hidden
files), sorted by name; a glob pattern (``*``, ``?``, ``[...]``, ``**`` for any depth)
contributes the image files it matches, sorted. A named file is taken whatever its
extension. A path that does not exist, a pattern that matches no image file and a folder
with no image file are errors (nothing is written): they are almost always typos.

**Names** (:func:`output_stems`, :func:`output_paths`): each input writes
``<stem>.png``, ``<stem>_color.png`` and, with ``overlay=True``, ``<stem>_overlay.png``.
``<stem>`` is the input's file name without its extension. When two inputs would write
the same output (``a/x.jpg`` and ``b/x.jpg``; ``x.jpg`` and ``x.png``; ``x.jpg`` and
``x_color.jpg``; names differing in case only, which clash on macOS and Windows) each
of them is prefixed with its parent folder's name (``a__x``, ``b__x``); inputs that
still clash also get their extension and more parent folders (``a__x_jpg``,
``p__a__x_jpg``), until every name is unique. Nothing is silently overwritten, and the
same inputs always get the same names. Existing outputs of an earlier run are replaced;
an output that would replace one of the inputs is an error (:func:`check_out_dir`).
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from unetseg.errors import UnetsegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = ("", "_color", "_overlay")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs`` (files, folders, glob patterns), in order, each once.

    See the module docstring for the rules; raises :class:`UnetsegError` naming the input
    for a path that does not exist, a pattern matching no image file or a folder holding none.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UnetsegError("no inputs given. Fix: pass image files, folders or glob patterns such as 'photos/*.jpg'")
    found: list[Path] = []
    seen: set[Path] = set()
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and _is_image_name(p))
            if not matches:
                raise UnetsegError(
                    f"{text}: no image files ({exts}) directly in this folder. Fix: pass the folder that holds "
                    f"the images, or a pattern such as '{Path(text) / '**' / '*.jpg'}' for subfolders"
                )
        elif glob.has_magic(text):
            matches = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if p.is_file() and _is_image_name(p))
            if not matches:
                raise UnetsegError(f"{text}: the pattern matches no image file ({exts}). Fix: correct the pattern")
        else:
            raise UnetsegError(f"{text}: no such file or folder. Fix: correct the path")
        for p in matches:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                found.append(p)
    return found


def _stem(path: Path, level: int, index: int) -> str:
    """The output stem of ``path`` at disambiguation ``level``: 0 is the file stem; 1 adds
    the parent folder (``a__x``); 2, 3, ... add the extension and 1, 2, ... parent folders
    (``a__x_jpg``, ``p__a__x_jpg``); past the last folder, the input's index."""
    absolute = Path(os.path.abspath(path))  # not resolve(): a symlink keeps its own name
    parents = [part for part in absolute.parent.parts if part != absolute.anchor]
    k, ext = (level, False) if level < 2 else (level - 1, True)
    name = "__".join([*parents[len(parents) - min(k, len(parents)) :], absolute.stem])
    if ext:
        name += "_" + absolute.suffix.lstrip(".").lower()
    if k > len(parents):
        name += f"_{index}"
    return name


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output stem per input such that no two inputs write the same file (compared
    without case, as on case-insensitive file systems). Deterministic: the same inputs in
    the same order get the same names; only inputs that clash are renamed."""
    levels = [0] * len(paths)
    while True:
        stems = [_stem(p, levels[i], i) for i, p in enumerate(paths)]
        owners: dict[str, set[int]] = defaultdict(set)
        for i, stem in enumerate(stems):
            for suffix in OUTPUT_SUFFIXES:
                owners[(stem + suffix).casefold()].add(i)
        clashing = {i for group in owners.values() if len(group) > 1 for i in group}
        if not clashing:
            return stems
        for i in clashing:
            levels[i] += 1


def output_paths(out_dir: Path, stem: str, overlay: bool) -> dict[str, Path]:
    paths = {"ids": out_dir / f"{stem}.png", "color": out_dir / f"{stem}_color.png"}
    if overlay:
        paths["overlay"] = out_dir / f"{stem}_overlay.png"
    return paths


def check_out_dir(out_dir: Path, paths: Sequence[Path], stems: Sequence[str], overlay: bool) -> None:
    """Raise :class:`UnetsegError` when ``out_dir`` cannot hold the outputs: it is a file,
    or an output name would replace an input (``--out`` pointed at the input folder),
    because that input would be lost to its own prediction halfway through the run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UnetsegError(f"--out {out_dir}: a file, not a folder. Fix: pass a folder (it is created if missing)")
    resolved_inputs = {p.resolve(): p for p in paths}
    for stem in stems:
        for target in output_paths(out_dir, stem, overlay).values():
            if target.resolve() in resolved_inputs:
                raise UnetsegError(
                    f"--out {out_dir}: writing {target.name} there would replace the input "
                    f"{resolved_inputs[target.resolve()]}. Fix: write the predictions to another folder"
                )
