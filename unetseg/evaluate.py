"""Evaluation: predictions over the exact-once eval stream into the distributed ConfusionMatrix.

``unetseg evaluate MODEL --data SHARDS --split val`` and
``accelerate launch -m unetseg.evaluate MODEL ...`` (any number of processes: every
sample is scored once, and the matrix is summed with one all-reduce, so the result is
identical) print a per-class table and write ``report.json`` with a row-normalised
confusion-matrix plot and a per-class IoU bar chart beside it.

Metrics are computed at the original mask resolution: with full-resolution evaluation
the padded pixels of a batch carry the ignore label; with ``eval_resize`` the logits of
each sample are resized back to its original mask before the argmax.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.errors import UnetsegError
from unetseg.metrics import ConfusionMatrix, SegmentationMetrics

TTA_MODES = ("none", "flip", "multiscale")
MULTISCALE = (0.75, 1.0, 1.25)


class TTA(nn.Module):
    """Test-time augmentation around a segmentation model: returns class probabilities
    averaged over the horizontal flip (``flip``), or over the flip at scales 0.75, 1 and
    1.25 (``multiscale``); ``none`` returns the model's logits unchanged."""

    def __init__(self, model: nn.Module, mode: str = "none"):
        super().__init__()
        if mode not in TTA_MODES:
            raise UnetsegError(f"--tta {mode!r}: unknown. Fix: use one of {', '.join(TTA_MODES)}")
        self.model, self.mode = model, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return self.model(x)
        size = x.shape[-2:]
        scales = MULTISCALE if self.mode == "multiscale" else (1.0,)
        total = None
        for scale in scales:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            for flip in (False, True):
                inp = xs.flip(-1) if flip else xs
                logits = self.model(inp).float()
                logits = logits.flip(-1) if flip else logits
                if scale != 1.0:
                    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                probs = logits.softmax(1)
                total = probs if total is None else total + probs
        return total / (2 * len(scales))


@torch.no_grad()
def confusion_matrix(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    num_classes: int,
    ignore_index: int | None,
    class_names: list[str] | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
    keep: int = 0,
) -> tuple[ConfusionMatrix, list[dict[str, torch.Tensor]]]:
    """This process's (not yet reduced) confusion matrix over ``batches``, and up to
    ``keep`` examples (normalised image, prediction, target) for pictures."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, class_names)
    examples: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        image = batch["image"].to(device, non_blocking=True)
        with autocast():
            logits = model(image)
        pred = logits.argmax(1)
        target = batch["mask"].to(device, non_blocking=True)
        if "full_mask" in batch:
            for i, full_target in enumerate(batch["full_mask"]):
                full_target = full_target.to(device, non_blocking=True)
                full = F.interpolate(logits[i : i + 1].float(), size=full_target.shape[-2:], mode="bilinear", align_corners=False)
                cm.update(full.argmax(1), full_target.unsqueeze(0))
        else:
            cm.update(pred, target)  # batch padding carries the ignore label
        for i in range(min(keep - len(examples), len(pred))):
            h, w = pred.shape[-2:] if "full_mask" in batch else batch["sizes"][i]
            examples.append({"image": image[i, :, :h, :w].cpu(), "pred": pred[i, :h, :w].cpu(), "target": target[i, :h, :w].cpu()})
    model.train(was_training)
    return cm, examples


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
    from accelerate import Accelerator

    from unetseg.checkpoint import load_model, model_folder
    from unetseg.stream import EvalStream, StreamStats, iterate, make_loader, open_source
    from unetseg.train import has_accelerator
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    for name, low in (("batch_size", 1), ("num_workers", 0), ("allow_missing", 0)):
        value = getattr(args, name)
        if value < low:
            raise UnetsegError(f"--{name.replace('_', '-')} {value}: must be {low} or more. Fix: use e.g. {low + 1}")
    eval_size = parse_size(args.eval_resize, "--eval-resize") if args.eval_resize else None
    accelerator = Accelerator(cpu=not has_accelerator(), mixed_precision=args.mixed_precision)
    folder = model_folder(args.model)
    model, config, model_info = load_model(folder)
    source = open_source(args.data, args.split, args.dataset_json)
    classes = model_info.classes
    check_classes(classes, source.info.classes, str(folder), args.data)
    if source.num_samples == 0 or not source.urls:
        raise UnetsegError(f"{source.describe()} has no samples to evaluate. Fix: pick another --split")
    resize = eval_size if args.eval_resize else config.get("data", {}).get("eval_resize")
    model = model.to(accelerator.device).eval()
    predictor = TTA(model, args.tta)
    # Read the whole split whatever fails (no budget), so that the error lists every bad sample.
    stats = StreamStats(max_bad_samples=None)
    stream = EvalStream(source, EvalTransform(EvalTransformConfig(resize=resize)), args.batch_size,
                        rank=accelerator.process_index, world_size=accelerator.num_processes, max_bad_samples=None)
    cm, _ = confusion_matrix(predictor, iterate(make_loader(stream, args.num_workers), stats), classes.num_classes,
                             classes.ignore_label, classes.names, accelerator.device, accelerator.autocast)
    result = cm.reduce().compute()
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
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)
        plots = write_plots(result, out)
        print(result, flush=True)
        if missing:
            print(f"warning: {result.num_samples} samples scored, the split has "
                  f"{expected if expected is not None else 'an unknown number'} ({bad} could not be read: "
                  f"{'; '.join(stats.problems()[:3])})", file=sys.stderr, flush=True)
        elif expected is None:
            print(f"warning: the split's size is unknown (its shards are not listed in dataset.json): "
                  f"{result.num_samples} samples scored", file=sys.stderr, flush=True)
        print(f"mIoU {100 * result.miou:.2f} over {result.num_samples} samples; wrote {out}, "
              + ", ".join(str(p) for p in plots), flush=True)
    accelerator.end_training()
    return result


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
