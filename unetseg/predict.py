"""``unetseg predict``: segment image files with a saved model.

>>> report = predict("runs/demo", ["photos/", "more/*.jpg", "one.png"], "preds", overlay=True)

This module owns the pixels and the model: decoding the inputs, batching them, running
the network, encoding and writing the outputs, and the report. Which files are read and
what each output is named is :mod:`unetseg.predict_inputs`.

**Outputs**, in ``out_dir`` (created if missing), one set per input, each at the
input's displayed size (after EXIF orientation):

- ``<stem>.png``: the class ids, an 8-bit grayscale (mode L) PNG, the same encoding as
  the masks ``unetseg pack`` reads, so a prediction can be packed or compared as is;
- ``<stem>_color.png``: the class ids through the dataset palette (RGB);
- ``<stem>_overlay.png`` with ``overlay=True``: ``(1 - alpha) * image + alpha * colour``,
  PNG so class boundaries are not smeared by JPEG compression.

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

import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from unetseg.errors import Problem, UnetsegError
from unetseg.imageio import IMAGE_DEPTH_FIX, BitDepthError, DecodeError, encode_png, open_fully, to_rgb_array
from unetseg.predict_inputs import check_out_dir, collect_inputs, output_paths, output_stems

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

    def __init__(self, model_path: str | os.PathLike, device: str | None = None, compile: str = "off",
                 batch_size: int = 4):
        import torch

        from unetseg.checkpoint import load_model
        from unetseg.models import saved_model_options
        from unetseg.runtime import compile_on
        from unetseg.scoring import compiled_model
        from unetseg.options import size_pair

        model, config, info = load_model(model_path)
        num_outputs = saved_model_options(config).num_classes
        if num_outputs != info.num_classes:
            raise UnetsegError(
                f"{model_path}: the model has {num_outputs} outputs but its dataset.json "
                f"{info.num_classes} classes. Fix: use the best/ or final/ folder written by `unetseg train`"
            )
        self.device = torch.device(device or default_device())
        self.model = model.to(self.device).eval()
        if compile_on(compile, self.device):
            # Batches padded to batch_size and to the model's own multiple: sizes that round
            # alike share a graph, and predictions are exactly the uncompiled model's.
            self.model = compiled_model(self.model, batch_size)
        self.config = config
        self.classes = info.classes
        self.palette = info.classes.palette_lut()
        data = config.get("data") or {}
        self.eval_resize = size_pair(data.get("eval_resize"), "eval_resize (in the model's config.yaml)")
        self.mean, self.std = saved_model_options(config).normalization()

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N HxWx3 uint8 images of one size -> NxHxW uint8 class ids."""
        import torch

        from unetseg.transforms import eval_input, resize_logits

        height, width = images[0].shape[:2]
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2)
            logits = self.model(eval_input(x, self.eval_resize, self.mean, self.std).contiguous())
            if self.eval_resize is not None:
                logits = resize_logits(logits, (height, width))
            return logits.argmax(1).to(torch.uint8).cpu().numpy()


# --- predict -------------------------------------------------------------------------


def _progress(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)
    return bar, bar.add_task("predict", total=total)


def _check_options(alpha: float, batch_size: int) -> None:
    """Reject bad options before any input is read or model loaded, so a typo costs nothing."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise UnetsegError(f"alpha {alpha!r}: must be between 0 and 1. Fix: use e.g. --alpha 0.5")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UnetsegError(f"batch size {batch_size!r}: must be a whole number >= 1. Fix: use e.g. --batch-size 4")


class _Writer:
    """The outcome of every input of one :func:`predict` call, keyed by input index.

    Batches finish in size order, not input order, so outcomes are collected by index and
    put back in input order only in :meth:`report`. Writing lives here too because a write
    that fails is one more outcome to record, not an error that stops the run.
    """

    def __init__(self, paths: list[Path], stems: list[str], out_dir: Path, overlay: bool, alpha: float,
                 palette: np.ndarray):
        self.paths, self.stems, self.out_dir = paths, stems, out_dir
        self.overlay, self.alpha, self.palette = overlay, alpha, palette
        self.failed: dict[int, Problem] = {}
        self.written: dict[int, Path] = {}

    def fail(self, i: int, what: str, fix: str = _UNREADABLE_FIX) -> None:
        self.failed[i] = Problem(str(self.paths[i]), what, fix)

    def write(self, i: int, image: np.ndarray, ids: np.ndarray) -> None:
        """Write the output set of input ``i``; a file system error fails that input only."""
        targets = output_paths(self.out_dir, self.stems[i], self.overlay)
        color = colorize(ids, self.palette)
        try:
            _write_atomic(targets["color"], encode_png(color))
            if self.overlay:
                _write_atomic(targets["overlay"], encode_png(blend(image, color, self.alpha)))
            _write_atomic(targets["ids"], encode_png(ids))  # last: its presence means the set is complete
        except OSError as e:
            self.fail(i, f"could not write its outputs ({type(e).__name__}: {e})",
                      f"check that {self.out_dir} is writable and has space")
            return
        self.written[i] = targets["ids"]

    def report(self, start: float) -> PredictReport:
        report = PredictReport(out_dir=self.out_dir)
        report.renamed = {p: s for p, s in zip(self.paths, self.stems) if s != p.stem}
        report.written = [(self.paths[i], self.written[i]) for i in sorted(self.written)]
        report.failures = [self.failed[i] for i in sorted(self.failed)]
        report.seconds = time.perf_counter() - start
        return report


def _group_by_size(writer: _Writer) -> dict[tuple[int, int], list[int]]:
    """Input indices by displayed size, read from the headers, so each batch holds images of
    one size and only one batch of pixels is in memory at a time. Unreadable headers fail."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, path in enumerate(writer.paths):
        try:
            size = _probe_size(path)
        except Exception as e:  # Pillow raises many types for a bad file
            writer.fail(i, f"unreadable image ({type(e).__name__}: {e})")
            continue
        groups[size].append(i)
    return groups


def _load_batches(writer: _Writer, chunk: list[int]) -> list[list[tuple[int, np.ndarray]]]:
    """Decode ``chunk`` and split it by decoded shape: a header can disagree with the pixels
    (normally it does not, and this is one batch). Files that fail to decode fail here."""
    by_size: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for i in chunk:
        try:
            image = load_image(writer.paths[i])
        except BitDepthError as e:
            writer.fail(i, f"the image holds {e}; predict reads 8-bit images only", IMAGE_DEPTH_FIX)
            continue
        except DecodeError as e:  # its message starts with the Pillow error type
            writer.fail(i, f"unreadable image ({e})")
            continue
        except Exception as e:
            writer.fail(i, f"unreadable image ({type(e).__name__}: {e})")
            continue
        by_size[image.shape].append((i, image))
    return list(by_size.values())


def _run_batch(segment: Segmenter, writer: _Writer, batch: list[tuple[int, np.ndarray]]) -> None:
    """Segment and write one batch. On out-of-memory, retry one image at a time, so one
    large image fails alone instead of taking its batch with it."""
    import torch

    try:
        ids = segment([image for _, image in batch])
    except torch.OutOfMemoryError:
        if len(batch) > 1:  # retry one image at a time
            if segment.device.type == "cuda":
                torch.cuda.empty_cache()
            for item in batch:
                _run_batch(segment, writer, [item])
            return
        h, w = batch[0][1].shape[:2]
        writer.fail(batch[0][0], f"out of memory on {segment.device} for a {w}x{h} image",
                    "run on a device with more memory, or downscale the image")
        return
    for (i, image), pred in zip(batch, ids):
        writer.write(i, image, pred)


def predict(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    overlay: bool = False,
    alpha: float = 0.5,
    batch_size: int = 4,
    device: str | None = None,
    progress: bool = True,
    compile: str = "off",
) -> PredictReport:
    """Segment every image named by ``inputs`` with the model saved at ``model_path`` (a
    run dir, its best/ or final/ folder, or a training checkpoint ``checkpoints/step-N``)
    into ``out_dir``; see the module docstring.

    ``device``: a torch device string; default ``cuda`` when available, else ``cpu``.
    ``progress``: a rich progress bar on stderr. ``compile``: ``off|on|auto``, torch.compile
    the model (auto: on CUDA); it pays for many images, not for a few (compiling takes
    tens of seconds). Raises :class:`UnetsegError` before
    writing anything for a bad option, input or model; a file that cannot be read or
    written is a failure in the report instead.
    """
    start = time.perf_counter()
    _check_options(alpha, batch_size)
    paths = collect_inputs(inputs)
    stems = output_stems(paths)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, paths, stems, overlay)
    segment = Segmenter(model_path, device, compile, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)

    writer = _Writer(paths, stems, out_dir, overlay, alpha, segment.palette)
    groups = _group_by_size(writer)
    bar, task = _progress(progress, len(paths))
    with bar:
        bar.advance(task, len(writer.failed))
        for members in groups.values():
            for pos in range(0, len(members), batch_size):
                chunk = members[pos : pos + batch_size]
                for batch in _load_batches(writer, chunk):
                    _run_batch(segment, writer, batch)
                bar.advance(task, len(chunk))
    return writer.report(start)


# --- command-line entry points (wired into unetseg/cli.py) -------------------------------


def main_predict(model: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 overlay: bool = False, alpha: float = 0.5, batch_size: int = 4, device: str | None = None,
                 compile: str = "off") -> int:
    """``unetseg predict``: run :func:`predict`, print a summary to stdout and the failures
    to stderr. Returns the exit code: 0 when every input was written, 1 when any failed.
    A :class:`UnetsegError` (bad option, input or model) propagates to the CLI."""
    from rich.console import Console

    stdout, stderr = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    report = predict(model, inputs, out, overlay=overlay, alpha=alpha, batch_size=batch_size, device=device,
                     progress=stderr.is_terminal, compile=compile)
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
