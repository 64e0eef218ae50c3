"""The ``unetseg`` command. Each command parses its options and calls one library function."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from unetseg.errors import InputProblems, UnetsegError

app = typer.Typer(
    help="U-Net semantic segmentation: pack data into shards, train, evaluate, predict.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
shards_app = typer.Typer(help="Inspect and check a shard folder.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class MaskEncoding(str, Enum):
    index = "index"
    rgb = "rgb"
    binary = "binary"


class UnknownColor(str, Enum):
    error = "error"
    ignore = "ignore"


class ImageFormat(str, Enum):
    keep = "keep"
    jpg = "jpg"
    png = "png"


class SynthFormat(str, Enum):
    shards = "shards"
    folders = "folders"


def _print_written(info, folder: Path, seconds: float) -> None:
    counts = ", ".join(f"{name}: {s.num_samples} samples in {len(s.shards)} shards" for name, s in info.splits.items())
    out.print(f"wrote {folder} ({counts}) in {seconds:.1f} s")


@app.command()
def synth(
    out_dir: Path = typer.Option(Path("shards/synthetic"), "--out", help="Folder to write."),
    train: int = typer.Option(2048, help="Training samples."),
    val: int = typer.Option(256, help="Validation samples."),
    size: str = typer.Option("64x64", help="Image size: HxW, H,W or one number for both sides (16..4096 pixels)."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    format: SynthFormat = typer.Option(SynthFormat.shards, help="shards: ready to train; folders: images/, masks/ and classes.json for `unetseg pack`."),
    shard_size: int = typer.Option(64, help="Samples per shard."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    workers: Optional[int] = typer.Option(None, help="Processes (default: all cores)."),
) -> None:
    """Generate the embedded synthetic 10-class dataset (objects told apart by shape)."""
    from unetseg.synth import synth as run

    start = time.perf_counter()
    result = run(out_dir, train=train, val=val, size=size, seed=seed, format=format.value,
                 shard_size=shard_size, overwrite=overwrite, workers=workers, progress=err.is_terminal)
    if format == SynthFormat.shards:
        _print_written(result, out_dir, time.perf_counter() - start)
    else:
        out.print(f"wrote {out_dir}/images, {out_dir}/masks and {out_dir}/classes.json; pack them with\n"
                  f"  unetseg pack --images {out_dir}/images --masks {out_dir}/masks --classes {out_dir}/classes.json --out DIR")


@app.command()
def pack(
    images: Path = typer.Option(..., help="Image folder: split subfolders (train/, val/, ...) or flat."),
    masks: Path = typer.Option(..., help="Mask folder with the same layout; masks are PNG."),
    classes: Path = typer.Option(..., help='classes.json: {"names": [...], "palette": [[r,g,b], ...], "ignore_index": int}.'),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write shards and dataset.json to."),
    mask_encoding: MaskEncoding = typer.Option(MaskEncoding.index, help="index: 8-bit class ids; rgb: palette colours; binary: 0/255."),
    unknown_color: UnknownColor = typer.Option(UnknownColor.error, help="rgb masks: a colour not in the palette is an error, or ignore_index."),
    val_fraction: Optional[float] = typer.Option(None, help="Flat folders only: share of samples drawn (seeded) into a val split."),
    seed: int = typer.Option(0, help="Seed of the val split and of the sample order in shards."),
    shard_size: int = typer.Option(64, help="Samples per shard."),
    image_format: ImageFormat = typer.Option(ImageFormat.keep, help="keep: JPEG/PNG as they are (BMP/TIFF become PNG); or re-encode."),
    quality: int = typer.Option(95, help="JPEG quality when re-encoding."),
    max_size: Optional[int] = typer.Option(None, help="Downscale so the long side is at most this (masks with nearest neighbour)."),
    skip_invalid: bool = typer.Option(False, help="Leave bad pairs out (reported) instead of stopping."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    workers: Optional[int] = typer.Option(None, help="Processes (default: all cores)."),
) -> None:
    """Pack folders of images and masks into WebDataset shards with a dataset.json."""
    from unetseg.pack import pack as run

    start = time.perf_counter()
    info, passed_over = run(
        images, masks, classes, out_dir, mask_encoding=mask_encoding.value, unknown_color=unknown_color.value,
        val_fraction=val_fraction, seed=seed, shard_size=shard_size, image_format=image_format.value,
        quality=quality, max_size=max_size, skip_invalid=skip_invalid, overwrite=overwrite, workers=workers,
        progress=err.is_terminal,
    )
    for path in passed_over[:10]:
        err.print(f"[yellow]passed over[/] {path}: not an image/mask file extension")
    if len(passed_over) > 10:
        err.print(f"[yellow]passed over[/] {len(passed_over) - 10} more files with other extensions")
    if info.skipped:
        err.print(f"[yellow]skipped {len(info.skipped)} invalid pair(s)[/] (listed under \"skipped\" in dataset.json):")
        for p in info.skipped:
            err.print(f"  - {p['path']}: {p['what']}. Fix: {p['fix']}", markup=False)
    _print_written(info, out_dir, time.perf_counter() - start)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train a U-Net (the same options as `python -m unetseg.train`; see `unetseg train --help`)."""
    from unetseg.train import main as train_main

    train_main(ctx.args)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def evaluate(ctx: typer.Context) -> None:
    """Evaluate a trained model on a split (the same options as `python -m unetseg.evaluate`)."""
    from unetseg.evaluate import main as evaluate_main

    evaluate_main(ctx.args)


class Compile(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A run dir (uses best/, then final/), a best/ or final/ folder, or a training checkpoint RUN/checkpoints/step-NNNNNNNN."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (their images, not recursive) or globs."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for <name>.png (class ids), <name>_color.png and overlays."),
    overlay: bool = typer.Option(False, help="Also write <name>_overlay.png: the image blended with its colour mask."),
    alpha: float = typer.Option(0.5, help="Weight of the colour mask in the overlay (0..1)."),
    batch_size: int = typer.Option(4, help="Images per forward pass (images of one size are batched together)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
    compile: Compile = typer.Option(Compile.off, help="torch.compile the model (auto: on for CUDA): worth it for many "
                                    "images; batches are padded to the model's own size multiple, so sizes that round "
                                    "alike share one graph, and the predictions are the uncompiled model's."),
) -> None:
    """Segment images: a class-index PNG and a colour PNG per input, at the input's size."""
    from unetseg.predict import main_predict

    raise typer.Exit(main_predict(model, inputs, out_dir, overlay=overlay, alpha=alpha, batch_size=batch_size, device=device,
                                  compile=compile.value))


@app.command()
def export(
    model: Path = typer.Argument(..., help="A run dir (uses best/, then final/), a best/ or final/ folder, or a training checkpoint RUN/checkpoints/step-NNNNNNNN."),
    format: ExportFormat = typer.Option(..., help="onnx (needs: pip install onnx onnxscript onnxruntime) or torchscript."),
    out: Path = typer.Option(..., help="File to write; checked against the eager model before it is renamed into place."),
) -> None:
    """Export a trained model to ONNX or TorchScript, with a numerical check."""
    from unetseg.export import main_export

    raise typer.Exit(main_export(model, format.value, out))


@app.command()
def report(
    run: Path = typer.Argument(..., help="A run dir (what training wrote to --output-dir), finished or still going."),
    data: Optional[str] = typer.Option(None, help="Shards to score the model on (default: the run's own data)."),
    split: str = typer.Option("val", help="Split to score and show."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: RUN/report.html)."),
    gallery: int = typer.Option(6, help="Worst and best images to show (each)."),
    batch_size: int = typer.Option(4, help="Images per forward pass."),
    num_workers: int = typer.Option(0, help="DataLoader workers reading the split."),
) -> None:
    """One self-contained HTML page for a run: sessions, curves, per-class table, confusion
    matrix, worst and best images, evaluations."""
    from unetseg.report import report as write_report

    written = write_report(run, data=data, split=split, out=out_path, gallery=gallery, batch_size=batch_size,
                           num_workers=num_workers)
    out.print(f"wrote {written}")


@shards_app.command("info")
def shards_info(folder: Path = typer.Argument(..., help="A shard folder with dataset.json.")) -> None:
    """Samples per split and the class-frequency table."""
    from unetseg.dataset import DatasetInfo
    from unetseg.shards import shards_info_table

    for table in shards_info_table(DatasetInfo.load(folder), folder):
        out.print(table)


@shards_app.command("preview")
def shards_preview(
    folder: Path = typer.Argument(..., help="A shard folder with dataset.json."),
    out_path: Path = typer.Option(Path("preview.png"), "--out", help="PNG to write."),
    split: str = typer.Option("train", help="Split to show."),
    n: int = typer.Option(16, help="Number of samples (the split's first ones)."),
    augmented: bool = typer.Option(False, help="Show them after the training augmentation."),
    config: Optional[Path] = typer.Option(None, help="Training YAML whose data section sets the augmentation "
                                          "(default: the training defaults)."),
    alpha: float = typer.Option(0.5, help="Weight of the mask colours over the image (0..1)."),
) -> None:
    """A grid of samples with their masks overlaid in the palette, as packed or augmented."""
    from unetseg.preview import preview

    written = preview(folder, out_path, split=split, n=n, augmented=augmented, config_path=config, alpha=alpha)
    out.print(f"wrote {written}")


@shards_app.command("verify")
def shards_verify(folder: Path = typer.Argument(..., help="A shard folder with dataset.json.")) -> None:
    """Decode every sample and check it against dataset.json; non-zero exit on any problem."""
    from unetseg.shards import verify_shards

    start = time.perf_counter()
    problems = verify_shards(folder, progress=err.is_terminal)
    if problems:
        err.print(f"[red]{folder}: {len(problems)} problem(s)[/]")
        for p in problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        raise typer.Exit(1)
    out.print(f"{folder}: every sample decodes and matches dataset.json ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    """Console entry point: user errors print as a message with the fix, no traceback."""
    try:
        app()
    except InputProblems as e:
        err.print(f"[red]error:[/] {e.args[0].splitlines()[0]}")
        for p in e.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        sys.exit(1)
    except UnetsegError as e:
        err.print("[red]error:[/] ", end="")
        err.print(str(e), markup=False, highlight=False)
        sys.exit(1)
