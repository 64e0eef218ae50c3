"""``unetseg evaluate``: score a saved model on a split, over the exact-once eval stream,
into the distributed ConfusionMatrix.

``unetseg evaluate MODEL --data SHARDS --split val`` and
``accelerate launch -m unetseg.evaluate MODEL ...`` (any number of processes: every
sample is scored once, and the matrix is summed with one all-reduce, so the result is
identical) print a per-class table and write ``report.json`` with a row-normalised
confusion-matrix plot and a per-class IoU bar chart beside it; for a run's best/ or final/
the result is also appended to the run's ``evaluations.jsonl``, which ``unetseg report``
shows.

The scoring loop and test-time augmentation are :mod:`unetseg.scoring`'s, shared with
training's periodic evaluation; the network input is :func:`unetseg.transforms.eval_input`,
shared with ``unetseg predict``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from unetseg.errors import UnetsegError
from unetseg.metrics import SegmentationMetrics
from unetseg.options import ConfigError, Options, Size, explained
from unetseg.scoring import TTA, TTA_MODES, confusion_matrix

# --- the command -------------------------------------------------------------------------


DESCRIPTION = ("Evaluate a trained model on a split at the original mask resolution. "
               "Run under `accelerate launch` for several processes or GPUs; the result is the same.")


class EvaluateOptionsError(ConfigError):
    what = "unetseg evaluate options"


class EvaluateOptions(Options):
    """What ``unetseg evaluate`` takes, typed and checked like the training config: the
    parser is generated from these fields (:func:`unetseg.flags.parse_command`), and bad
    values are refused, all at once, before any model is loaded."""

    command = "unetseg evaluate"
    command_line = True
    error_class = EvaluateOptionsError

    model: str = Field(json_schema_extra={**explained("a folder"), "positional": True},
                       description="A run dir (uses best/, then final/), a best/ or final/ folder, or a training "
                       "checkpoint RUN/checkpoints/step-NNNNNNNN.")
    data: str = Field(json_schema_extra=explained("a shard folder, URL or pattern"),
                      description="Shard folder or URL, or a shard pattern.")
    split: str = Field("val", description="Split to evaluate.")
    dataset_json: str | None = Field(None, description="dataset.json for a shard pattern that has none beside it.")
    out: str = Field("report.json", description="Report path; the plots go beside it.")
    batch_size: int = Field(4, ge=1, description="Images per batch and process.")
    tta: Literal[TTA_MODES] = Field("none", description="Test-time augmentation.")
    eval_resize: Size = Field(None, description="Feed the network images resized to H,W. Default: as in training.")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per process.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="Mixed precision. Default: what accelerate launch says, else no.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the model, batches padded to one shape so it compiles once. auto: on for CUDA.")
    allow_missing: int = Field(0, ge=0, description="Samples of the split that may be unreadable and left out of the "
                               "score; with more missing, no report is written and the exit code is 1.")


def parser() -> argparse.ArgumentParser:
    """The ``unetseg evaluate`` parser, one argument or flag per :class:`EvaluateOptions` field."""
    from unetseg.flags import command_parser

    return command_parser(EvaluateOptions, DESCRIPTION)


def parse_args(argv: list[str] | None = None) -> EvaluateOptions:
    """The evaluate options from command-line arguments (``sys.argv`` when ``None``)."""
    from unetseg.flags import parse_command

    return parse_command(EvaluateOptions, DESCRIPTION, argv)


def check_classes(model_classes, data_classes, model_path: str, data: str) -> None:
    """Stop when the data's classes are not the ones the model was trained on."""
    if list(model_classes.names) != list(data_classes.names) or model_classes.ignore_index != data_classes.ignore_index:
        raise UnetsegError(
            f"{data}: classes {data_classes.names} (ignore_index {data_classes.ignore_index}) differ from the "
            f"{len(model_classes.names)} classes {model_classes.names} (ignore_index {model_classes.ignore_index}) "
            f"that {model_path} was trained on. Fix: evaluate on shards packed with the model's classes.json"
        )


def run(args: EvaluateOptions) -> SegmentationMetrics:
    """Evaluate as ``args`` say; every process returns the same (reduced) metrics."""
    from unetseg.checkpoint import load_model, model_folder, normalization
    from unetseg.runtime import make_accelerator
    from unetseg.sources import open_source

    accelerator = make_accelerator(args.mixed_precision)
    folder = model_folder(args.model)
    model, config, model_info = load_model(folder)
    source = open_source(args.data, args.split, args.dataset_json)
    check_classes(model_info.classes, source.info.classes, str(folder), args.data)
    if source.num_samples == 0 or not source.urls:
        raise UnetsegError(f"{source.describe()} has no samples to evaluate. Fix: pick another --split")
    resize = args.eval_resize if args.eval_resize is not None else config.get("data", {}).get("eval_resize")
    result, stats = score(args, accelerator, model, source, model_info.classes, resize, normalization(config))
    bad = stats.reduce()
    expected = source.num_samples
    missing = expected - result.num_samples if expected is not None else bad
    if missing > args.allow_missing:
        lines = "\n  ".join(stats.problems() or ["(the shards hold fewer samples than dataset.json lists)"])
        raise UnetsegError(
            f"{args.data}: {missing} of the {expected if expected is not None else '?'} samples of split {args.split!r} "
            f"could not be scored, more than --allow-missing {args.allow_missing}; no report written:\n  {lines}\n"
            "Fix: run `unetseg shards verify` on the shard folder and re-pack the shards named above, "
            f"or pass --allow-missing {missing} to score the rest"
        )
    if accelerator.is_main_process:
        report = {
            "model": str(folder), "data": str(args.data), "split": args.split, "tta": args.tta,
            "eval_resize": resize, "num_processes": accelerator.num_processes, "bad_samples": bad,
            "split_samples": expected, "missing_samples": missing, "unreadable": stats.problems(), **result.to_dict(),
        }
        write_report(report, result, Path(args.out), stats)
        record_in_run(folder, report, Path(args.out))
    accelerator.end_training()
    return result


def score(args: EvaluateOptions, accelerator, model, source, classes, resize, norm):
    """This split's reduced metrics, every sample once over all processes, and the stream's
    record of unreadable samples (read whatever fails, with no budget, so that the error
    lists every bad sample)."""
    from unetseg.badsamples import StreamStats
    from unetseg.loaders import iterate, make_loader
    from unetseg.stream import EvalStream
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    predictor = TTA(maybe_compiled(args, model.to(accelerator.device).eval(), accelerator.device, source, resize), args.tta)
    stats = StreamStats(max_bad_samples=None)
    stream = EvalStream(source, EvalTransform(EvalTransformConfig(resize=resize, mean=norm[0], std=norm[1])), args.batch_size,
                        rank=accelerator.process_index, world_size=accelerator.num_processes, max_bad_samples=None)
    cm, _ = confusion_matrix(predictor, iterate(make_loader(stream, args.num_workers), stats), classes.num_classes,
                             classes.ignore_label, classes.names, accelerator.device, accelerator.autocast)
    return cm.reduce().compute(), stats


def maybe_compiled(args: EvaluateOptions, model, device, source, resize):
    """The model, or compiled over batches padded to the split's largest image (or the
    eval resize): one shape for the whole split."""
    from unetseg.runtime import compile_on
    from unetseg.scoring import compiled_model

    if not compile_on(args.compile, device):
        return model
    split = source.info.splits.get(args.split)
    listed = split.shapes() if split is not None else {}  # unknown: each batch rounded up to the multiple
    sizes = list(listed) if resize is None else [tuple(resize)]
    return compiled_model(model, args.batch_size, max((h for h, _ in sizes), default=0), max((w for _, w in sizes), default=0))


def record_in_run(folder: Path, report: dict, out: Path) -> None:
    """Append the result to the run's ``evaluations.jsonl`` (for ``unetseg report``) when
    the model is a run's best/ or final/, or one of its checkpoints."""
    from unetseg.checkpoint import is_checkpoint, owning_run
    from unetseg.runstate import append_jsonl, now

    checkpoint, run_dir = is_checkpoint(folder), owning_run(folder)
    if not (run_dir / "metrics.jsonl").is_file():
        return
    record = {key: report[key] for key in ("split", "data", "tta", "eval_resize", "mIoU", "pixel_accuracy", "num_samples")}
    record.update(time=now(), model=f"{folder.parent.name}/{folder.name}" if checkpoint else folder.name,
                  report=str(out.resolve()), per_class_iou={c: v["iou"] for c, v in report["per_class"].items()})
    try:
        append_jsonl(run_dir / "evaluations.jsonl", record)
    except OSError as e:  # the report is written; the run dir may be read-only
        print(f"warning: could not record this evaluation in {run_dir / 'evaluations.jsonl'}: {e}", file=sys.stderr)


def write_report(report: dict, result: SegmentationMetrics, out: Path, stats) -> None:
    """``report.json`` (written whole or not at all), the plots beside it, and the table."""
    from unetseg.checkpoint import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    plots = write_plots(result, out)
    print(result, flush=True)
    expected, missing = report["split_samples"], report["missing_samples"]
    if missing:
        print(f"warning: {result.num_samples} samples scored, the split has "
              f"{expected if expected is not None else 'an unknown number'} ({report['bad_samples']} could not be "
              f"read: {'; '.join(stats.problems()[:3])})", file=sys.stderr, flush=True)
    elif expected is None:
        print(f"warning: the split's size is unknown (its shards are not listed in dataset.json): "
              f"{result.num_samples} samples scored", file=sys.stderr, flush=True)
    print(f"mIoU {100 * result.miou:.2f} over {result.num_samples} samples; wrote {out}, "
          + ", ".join(str(p) for p in plots), flush=True)


def write_plots(result: SegmentationMetrics, report: Path) -> list[Path]:
    """A row-normalised confusion matrix and a per-class IoU bar chart, as PNGs beside
    ``report``, sized by the number of classes up to a cap: many classes (255 gave a
    14130 x 14010 px matrix and gigabytes of memory) get a heat map without per-cell
    numbers or per-class names, whose numbers are in ``report.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    max_inches, max_named, max_annotated = 12.0, 40, 25  # at 120 dpi: at most 1440 px of classes
    names = list(result.class_names)
    matrix = np.asarray(result.confusion_matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(names)
    paths = [report.with_name(report.stem + "_confusion.png"), report.with_name(report.stem + "_iou.png")]

    def class_ticks(set_ticks, **style) -> str:
        """Every class by name, or (too many to read) a few class ids; returns the axis unit."""
        if n <= max_named:
            set_ticks(range(n), names, **style)
            return ""
        set_ticks(range(0, n, -(-n // 10)))
        return " (class id)"

    size = min(max_inches, max(4.0, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("predicted" + class_ticks(ax.set_xticks, rotation=60, ha="right"))
    ax.set_ylabel("ground truth" + class_ticks(ax.set_yticks))
    ax.set_title("confusion matrix (each row sums to 1)")
    if n <= max_annotated:
        for i in range(n):
            for j in range(n):
                if normalised[i, j] >= 0.005:
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    iou = [100 * v if v == v else 0.0 for v in result.iou]
    fig, ax = plt.subplots(figsize=(min(max_inches + 4, max(5.0, 0.5 * n + 2)), 4))
    ax.bar(range(n), iou, color="#4878a8")
    ax.axhline(100 * result.miou, color="#c44e52", linestyle="--", label=f"mIoU {100 * result.miou:.1f}")
    ax.set_xlabel(class_ticks(ax.set_xticks, rotation=60, ha="right").strip(" ()"))
    ax.set_ylabel("IoU %")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("per-class IoU")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except UnetsegError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        from unetseg.distributed import end_process_group

        end_process_group()


if __name__ == "__main__":
    main()
