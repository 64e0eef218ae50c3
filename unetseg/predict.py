"""``unetseg predict``: segment image files with a saved model.

>>> report = predict("runs/demo", ["photos/", "more/*.jpg", "one.png"], "preds", overlay=True)

**Inputs** (:func:`collect_inputs`): files, folders and glob patterns, in the order
given, each file once. A folder contributes the image files directly inside it
(jpg, jpeg, png, bmp, tif, tiff, webp, any case; not its subfolders, not hidden
files), sorted by name; a glob pattern (``*``, ``?``, ``[...]``, ``**`` for any depth)
contributes the image files it matches, sorted. A named file is taken whatever its
extension. A path that does not exist, a pattern that matches no image file and a folder
with no image file are errors (nothing is written): they are almost always typos.

**Outputs**, in ``out_dir`` (created if missing), one set per input, each at the
input's displayed size (after EXIF orientation):

- ``<stem>.png``: the class ids, an 8-bit grayscale (mode L) PNG, the same encoding as
  the masks ``unetseg pack`` reads, so a prediction can be packed or compared as is;
- ``<stem>_color.png``: the class ids through the dataset palette (RGB);
- ``<stem>_overlay.png`` with ``overlay=True``: ``(1 - alpha) * image + alpha * colour``,
  PNG so class boundaries are not smeared by JPEG compression.

``<stem>`` is the input's file name without its extension. When two inputs would write
the same output (``a/x.jpg`` and ``b/x.jpg``; ``x.jpg`` and ``x.png``; ``x.jpg`` and
``x_color.jpg``; names differing in case only, which clash on macOS and Windows) each
of them is prefixed with its parent folder's name (``a__x``, ``b__x``); inputs that
still clash also get their extension and more parent folders (``a__x_jpg``,
``p__a__x_jpg``), until every name is unique. Nothing is silently overwritten, and the
same inputs always get the same names. Existing outputs of an earlier run are replaced;
an output that would replace one of the inputs is an error.

Each file is written under a hidden temporary name and renamed when complete, so an
interrupted run never leaves a half-written PNG under an output name; ``<stem>.png`` is
written last, so its presence means the whole set is there.

**Images**: decoded with Pillow, EXIF orientation applied (``ImageOps.exif_transpose``;
unlike ``unetseg pack``, which keeps stored pixels because masks are drawn on them),
converted to RGB as the packer does (grayscale and palette expanded, alpha dropped), then
scaled to [0, 1] and normalised with the ImageNet mean and std, as in training. Images of
equal size are batched together (up to ``batch_size``); the model pads each batch
internally, so a prediction does not depend on the other images in its batch. When the
model was trained with ``eval_resize``, the network sees the image resized to that size
and the logits are resized back before the argmax, as in evaluation.

An unreadable or truncated file (or one whose outputs cannot be written) is reported
and skipped; the others are still processed.
"""

from __future__ import annotations

import glob
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from unetseg.errors import Problem, UnetsegError
from unetseg.imageio import DecodeError, encode_png, open_fully, to_rgb_array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = ("", "_color", "_overlay")
_EXIF_ORIENTATION = 0x0112
_UNREADABLE_FIX = "check that the file opens in an image viewer; re-export it or leave it out"


@dataclass
class PredictReport:
    """What a :func:`predict` call did."""

    out_dir: Path
    written: list[tuple[Path, Path]] = field(default_factory=list)
    """(input, its class-id PNG) for every input whose outputs were all written, in input order."""
    failures: list[Problem] = field(default_factory=list)
    """Inputs that were skipped, with the reason, in input order."""
    renamed: dict[Path, str] = field(default_factory=dict)
    """Inputs whose output stem is not their file stem (shared names), and the stem used."""
    seconds: float = 0.0

    @property
    def num_written(self) -> int:
        return len(self.written)

    @property
    def num_failed(self) -> int:
        return len(self.failures)

    @property
    def num_inputs(self) -> int:
        return self.num_written + self.num_failed


# --- inputs and output names ------------------------------------------------------------


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


# --- images --------------------------------------------------------------------------


def _probe_size(path: Path) -> tuple[int, int]:
    """(H, W) as displayed, from the header only (nothing decoded)."""
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a malformed EXIF block: the full load decides
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def load_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB as displayed (EXIF orientation applied); raises on a bad file."""
    img = open_fully(path.read_bytes())  # decodes every pixel: a truncated file fails here
    img = ImageOps.exif_transpose(img)
    return to_rgb_array(img)


def colorize(ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 colours (``palette`` is a 256x3 uint8 lookup table)."""
    return palette[ids]


def blend(image: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * color``, rounded to uint8."""
    mixed = image.astype(np.float32) * (1.0 - alpha) + color.astype(np.float32) * alpha
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the model -----------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Segmenter:
    """A saved model ready to predict class ids for batches of equal-size RGB images."""

    def __init__(self, model_path: str | os.PathLike, device: str | None = None):
        import torch

        from unetseg.checkpoint import load_model
        from unetseg.transforms import IMAGENET_MEAN, IMAGENET_STD, _size_pair

        model, config, info = load_model(model_path)
        if model.config.num_classes != info.num_classes:
            raise UnetsegError(
                f"{model_path}: the model has {model.config.num_classes} outputs but its dataset.json "
                f"{info.num_classes} classes. Fix: use the best/ or final/ folder written by `unetseg train`"
            )
        self.device = torch.device(device or default_device())
        self.model = model.to(self.device).eval()
        self.config = config
        self.classes = info.classes
        self.palette = np.zeros((256, 3), dtype=np.uint8)
        self.palette[: info.num_classes] = np.asarray(info.classes.palette, dtype=np.uint8)
        data = config.get("data") or {}
        self.eval_resize = _size_pair(data.get("eval_resize"), "eval_resize (in the model's config.yaml)")
        self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N HxWx3 uint8 images of one size -> NxHxW uint8 class ids."""
        import torch
        import torch.nn.functional as F
        from torchvision.transforms.v2 import functional as TF

        height, width = images[0].shape[:2]
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2)
            if self.eval_resize is not None:  # as EvalTransform: resize the uint8 image, then normalise
                x = TF.resize(x, list(self.eval_resize), antialias=True)
            x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
            logits = self.model(x.contiguous())
            if self.eval_resize is not None:
                logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            return logits.argmax(1).to(torch.uint8).cpu().numpy()


# --- predict -------------------------------------------------------------------------


def _progress(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)
    return bar, bar.add_task("predict", total=total)


def predict(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    overlay: bool = False,
    alpha: float = 0.5,
    batch_size: int = 4,
    device: str | None = None,
    progress: bool = True,
) -> PredictReport:
    """Segment every image named by ``inputs`` with the model saved at ``model_path`` (a
    run dir, or its best/ or final/ folder) into ``out_dir``; see the module docstring.

    ``device``: a torch device string; default ``cuda`` when available, else ``cpu``.
    ``progress``: a rich progress bar on stderr. Raises :class:`UnetsegError` before
    writing anything for a bad option, input or model; a file that cannot be read or
    written is a failure in the report instead.
    """
    import torch

    start = time.perf_counter()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise UnetsegError(f"alpha {alpha!r}: must be between 0 and 1. Fix: use e.g. --alpha 0.5")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UnetsegError(f"batch size {batch_size!r}: must be a whole number >= 1. Fix: use e.g. --batch-size 4")
    paths = collect_inputs(inputs)
    stems = output_stems(paths)
    out_dir = Path(out_dir)
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
    segment = Segmenter(model_path, device)
    out_dir.mkdir(parents=True, exist_ok=True)

    report = PredictReport(out_dir=out_dir)
    report.renamed = {p: s for p, s in zip(paths, stems) if s != p.stem}
    failed: dict[int, Problem] = {}
    written: dict[int, Path] = {}

    def fail(i: int, what: str, fix: str = _UNREADABLE_FIX) -> None:
        failed[i] = Problem(str(paths[i]), what, fix)

    # Group the inputs by displayed size, read from the headers, so each batch holds
    # images of one size and only one batch of pixels is in memory at a time.
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        try:
            size = _probe_size(path)
        except Exception as e:  # Pillow raises many types for a bad file
            fail(i, f"unreadable image ({type(e).__name__}: {e})")
            continue
        groups[size].append(i)

    def write(i: int, image: np.ndarray, ids: np.ndarray) -> None:
        targets = output_paths(out_dir, stems[i], overlay)
        color = colorize(ids, segment.palette)
        try:
            _write_atomic(targets["color"], encode_png(color))
            if overlay:
                _write_atomic(targets["overlay"], encode_png(blend(image, color, alpha)))
            _write_atomic(targets["ids"], encode_png(ids))  # last: its presence means the set is complete
        except OSError as e:
            fail(i, f"could not write its outputs ({type(e).__name__}: {e})", f"check that {out_dir} is writable and has space")
            return
        written[i] = targets["ids"]

    def run(batch: list[tuple[int, np.ndarray]]) -> None:
        try:
            ids = segment([image for _, image in batch])
        except torch.OutOfMemoryError:
            if len(batch) > 1:  # retry one image at a time
                if segment.device.type == "cuda":
                    torch.cuda.empty_cache()
                for item in batch:
                    run([item])
                return
            h, w = batch[0][1].shape[:2]
            fail(batch[0][0], f"out of memory on {segment.device} for a {w}x{h} image",
                 "run on a device with more memory, or downscale the image")
            return
        for (i, image), pred in zip(batch, ids):
            write(i, image, pred)

    bar, task = _progress(progress, len(paths))
    with bar:
        bar.advance(task, len(failed))
        for members in groups.values():
            for pos in range(0, len(members), batch_size):
                chunk = members[pos : pos + batch_size]
                by_size: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = defaultdict(list)
                for i in chunk:
                    try:
                        image = load_image(paths[i])
                    except DecodeError as e:  # its message starts with the Pillow error type
                        fail(i, f"unreadable image ({e})")
                        continue
                    except Exception as e:
                        fail(i, f"unreadable image ({type(e).__name__}: {e})")
                        continue
                    # Normally one group: the size in the header is the decoded size.
                    by_size[image.shape].append((i, image))
                for batch in by_size.values():
                    run(batch)
                bar.advance(task, len(chunk))

    report.written = [(paths[i], written[i]) for i in sorted(written)]
    report.failures = [failed[i] for i in sorted(failed)]
    report.seconds = time.perf_counter() - start
    return report


# --- command-line entry points (wired into unetseg/cli.py) -------------------------------


def main_predict(model: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 overlay: bool = False, alpha: float = 0.5, batch_size: int = 4, device: str | None = None) -> int:
    """``unetseg predict``: run :func:`predict`, print a summary to stdout and the failures
    to stderr. Returns the exit code: 0 when every input was written, 1 when any failed.
    A :class:`UnetsegError` (bad option, input or model) propagates to the CLI."""
    from rich.console import Console

    stdout, stderr = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    report = predict(model, inputs, out, overlay=overlay, alpha=alpha, batch_size=batch_size, device=device,
                     progress=stderr.is_terminal)
    for path, stem in list(report.renamed.items())[:10]:
        stdout.print(f"{path}: shares its name with another input, written as {stem}.png", markup=False, highlight=False)
    if len(report.renamed) > 10:
        stdout.print(f"... and {len(report.renamed) - 10} more inputs renamed the same way")
    kinds = "<stem>.png (class ids), <stem>_color.png (colours)" + (", <stem>_overlay.png" if overlay else "")
    stdout.print(
        f"segmented {report.num_written} of {report.num_inputs} images in {report.seconds:.1f} s: "
        f"{kinds} in {report.out_dir}", markup=False, highlight=False,
    )
    if report.failures:
        stderr.print(f"[red]{report.num_failed} of {report.num_inputs} images failed[/] (skipped):")
        for problem in report.failures:
            stderr.print(f"  - {problem}", markup=False, highlight=False)
        return 1
    return 0
