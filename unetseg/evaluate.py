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

from unetseg.errors import UnetsegError
from unetseg.metrics import SegmentationMetrics
from unetseg.scoring import TTA, TTA_MODES, confusion_matrix

# --- the command -------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unetseg evaluate",
        description="Evaluate a trained model on a split at the original mask resolution. "
        "Run under `accelerate launch` for several processes or GPUs; the result is the same.",
    )
    p.add_argument("model", help="a run dir (uses best/, then final/) or a best/ or final/ folder")
    p.add_argument("--data", required=True, help="shard folder or URL, or a shard pattern")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--dataset-json", help="dataset.json for a shard pattern that has none beside it")
    p.add_argument("--out", default="report.json", help="report path; the plots go beside it (default: report.json)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch and process (default: 4)")
    p.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation (default: none)")
    p.add_argument("--eval-resize", help="H,W: feed the network resized images (default: as in training)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default: 2)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: from accelerate launch, else no")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model, batches padded to one shape so it compiles once "
                        "(default: auto, on for CUDA)")
    p.add_argument("--allow-missing", type=int, default=0, metavar="N",
                   help="samples of the split that may be unreadable and left out of the score (default: 0, "
                        "every sample must be scored, else the exit code is 1)")
    return p


def check_classes(model_classes, data_classes, model_path: str, data: str) -> None:
    """Stop when the data's classes are not the ones the model was trained on."""
    if list(model_classes.names) != list(data_classes.names) or model_classes.ignore_index != data_classes.ignore_index:
        raise UnetsegError(
            f"{data}: classes {data_classes.names} (ignore_index {data_classes.ignore_index}) differ from the "
            f"{len(model_classes.names)} classes {model_classes.names} (ignore_index {model_classes.ignore_index}) "
            f"that {model_path} was trained on. Fix: evaluate on shards packed with the model's classes.json"
        )


def parse_size(text: str, flag: str) -> list[int]:
    """``H,W`` (or one size for both) as two positive ints."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise UnetsegError(f"{flag} {text!r}: expected H,W or one size for both. Fix: use e.g. 270,360 or 256")
    return values * 2 if len(values) == 1 else values


def run(args: argparse.Namespace) -> SegmentationMetrics:
    """Evaluate as ``args`` say; every process returns the same (reduced) metrics."""
    from unetseg.checkpoint import load_model, model_folder
    from unetseg.runtime import make_accelerator
    from unetseg.sources import open_source

    for name, low in (("batch_size", 1), ("num_workers", 0), ("allow_missing", 0)):
        value = getattr(args, name)
        if value < low:
            raise UnetsegError(f"--{name.replace('_', '-')} {value}: must be {low} or more. Fix: use e.g. {low + 1}")
    eval_size = parse_size(args.eval_resize, "--eval-resize") if args.eval_resize else None
    accelerator = make_accelerator(args.mixed_precision)
    folder = model_folder(args.model)
    model, config, model_info = load_model(folder)
    source = open_source(args.data, args.split, args.dataset_json)
    check_classes(model_info.classes, source.info.classes, str(folder), args.data)
    if source.num_samples == 0 or not source.urls:
        raise UnetsegError(f"{source.describe()} has no samples to evaluate. Fix: pick another --split")
    resize = eval_size if args.eval_resize else config.get("data", {}).get("eval_resize")
    result, stats = score(args, accelerator, model, source, model_info.classes, resize)
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


def score(args: argparse.Namespace, accelerator, model, source, classes, resize):
    """This split's reduced metrics, every sample once over all processes, and the stream's
    record of unreadable samples (read whatever fails, with no budget, so that the error
    lists every bad sample)."""
    from unetseg.badsamples import StreamStats
    from unetseg.loaders import iterate, make_loader
    from unetseg.stream import EvalStream
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    predictor = TTA(maybe_compiled(args, model.to(accelerator.device).eval(), accelerator.device, source, resize), args.tta)
    stats = StreamStats(max_bad_samples=None)
    stream = EvalStream(source, EvalTransform(EvalTransformConfig(resize=resize)), args.batch_size,
                        rank=accelerator.process_index, world_size=accelerator.num_processes, max_bad_samples=None)
    cm, _ = confusion_matrix(predictor, iterate(make_loader(stream, args.num_workers), stats), classes.num_classes,
                             classes.ignore_label, classes.names, accelerator.device, accelerator.autocast)
    return cm.reduce().compute(), stats


def maybe_compiled(args: argparse.Namespace, model, device, source, resize):
    """The model, or compiled over batches padded to the split's largest image (or the
    eval resize): one shape for the whole split."""
    from unetseg.runtime import compile_on
    from unetseg.scoring import compiled_model

    if not compile_on(args.compile, device):
        return model
    split = source.info.splits.get(args.split)
    listed = split.image_sizes if split is not None else {}  # unknown: each batch rounded up to the multiple
    sizes = [[int(v) for v in size.split("x")] for size in listed] if resize is None else [list(resize)]
    return compiled_model(model, args.batch_size, max((h for h, _ in sizes), default=0), max((w for _, w in sizes), default=0))


def record_in_run(folder: Path, report: dict, out: Path) -> None:
    """Append the result to the run's ``evaluations.jsonl`` (for ``unetseg report``) when
    the model is a run's best/ or final/."""
    from unetseg.runstate import append_jsonl, now

    run_dir = folder.parent
    if not (run_dir / "metrics.jsonl").is_file():
        return
    record = {key: report[key] for key in ("split", "data", "tta", "eval_resize", "mIoU", "pixel_accuracy", "num_samples")}
    record.update(time=now(), model=folder.name,
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
    """A row-normalised confusion matrix and a per-class IoU bar chart, as PNGs beside ``report``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result.class_names)
    matrix = np.asarray(result.confusion_matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(names)
    paths = [report.with_name(report.stem + "_confusion.png"), report.with_name(report.stem + "_iou.png")]

    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (each row sums to 1)")
    if n <= 25:
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
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * n + 2), 4))
    ax.bar(range(n), iou, color="#4878a8")
    ax.axhline(100 * result.miou, color="#c44e52", linestyle="--", label=f"mIoU {100 * result.miou:.1f}")
    ax.set_xticks(range(n), names, rotation=60, ha="right")
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
        run(parser().parse_args(argv))
    except UnetsegError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        from unetseg.distributed import end_process_group

        end_process_group()


if __name__ == "__main__":
    main()
