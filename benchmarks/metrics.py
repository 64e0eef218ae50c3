"""Time ConfusionMatrix.update against torchmetrics' MulticlassJaccardIndex.update.

Both get the same tensors: a batch of random class-index predictions and targets
(CamVid-like by default: 8 x 360 x 480, 11 classes, 5% of target pixels set to
ignore_index 255). torchmetrics is timed with its default argument validation and
with ``validate_args=False``. Runs on the CPU, and also on the GPU when CUDA is
available. Each update is timed on its own (with a CUDA synchronize on either side
on the GPU) after warm-up calls, the implementations taking turns; the median over
the repeats is reported.

The last line printed is one JSON object: ``pixels_per_s`` and
``torchmetrics_pixels_per_s`` (default validation) for the CPU, plus the shape,
versions, thread count and a ``devices`` entry with every number for each device.

    python benchmarks/metrics.py --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torchmetrics
from torchmetrics.classification import MulticlassJaccardIndex

from unetseg.metrics import ConfusionMatrix


def make_inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.height, args.width)
    target = torch.randint(0, args.classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < args.ignore_fraction] = args.ignore_index
    if args.logits:
        pred = torch.randn(args.batch, args.classes, args.height, args.width, generator=generator)
    else:
        pred = torch.randint(0, args.classes, shape, generator=generator)
    return pred.to(device), target.to(device)


def time_round_robin(
    calls: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in turns so that a load change on
    the machine affects all of them alike rather than whichever ran last."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def bench_device(args: argparse.Namespace, device: torch.device) -> dict[str, float | bool]:
    pred, target = make_inputs(args, device)
    pixels = target.numel()

    def ours() -> ConfusionMatrix:
        return ConfusionMatrix(args.classes, ignore_index=args.ignore_index)

    def theirs(validate: bool) -> MulticlassJaccardIndex:
        return MulticlassJaccardIndex(
            args.classes, average="macro", ignore_index=args.ignore_index, validate_args=validate
        ).to(device)

    # Same counts before timing anything, so the comparison is like for like.
    check_ours, check_theirs = ours(), theirs(True)
    check_ours.update(pred, target)
    check_theirs.update(pred, target)
    agree = torch.equal(check_ours.matrix, check_theirs.confmat.to(torch.int64))

    candidates = {"unetseg": ours(), "torchmetrics": theirs(True), "torchmetrics_no_validation": theirs(False)}
    calls = {name: (lambda m=metric: m.update(pred, target)) for name, metric in candidates.items()}
    timings = time_round_robin(calls, device, args.warmup, args.repeats)
    result: dict[str, float | bool] = {"matrices_agree": agree}
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        result[f"{name}_median_s"] = median
        result[f"{name}_min_s"] = min(seconds)
        result[f"{name}_pixels_per_s"] = pixels / median
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--ignore-index", type=int, default=255)
    parser.add_argument("--ignore-fraction", type=float, default=0.05)
    parser.add_argument("--logits", action="store_true", help="pass (N, C, H, W) float logits instead of indices")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda", torch.cuda.current_device()))

    pixels = args.batch * args.height * args.width
    input_kind = "logits" if args.logits else "indices"
    print(
        f"update() on {args.batch}x{args.height}x{args.width} {input_kind}, {args.classes} classes, "
        f"{args.ignore_fraction:.0%} ignore={args.ignore_index}; median of {args.repeats} after {args.warmup} "
        f"warm-up; torch {torch.__version__}, torchmetrics {torchmetrics.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    header = (
        f"{'device':<8} {'implementation':<28} {'median ms':>10} {'min ms':>8} {'Mpixel/s':>10} "
        f"{'unetseg speedup':>16}"
    )
    print(header)
    print("-" * len(header))
    per_device = {}
    for device in devices:
        result = bench_device(args, device)
        per_device[device.type] = result
        for name in ("unetseg", "torchmetrics", "torchmetrics_no_validation"):
            ratio = result["unetseg_pixels_per_s"] / result[f"{name}_pixels_per_s"]
            print(
                f"{device.type:<8} {name:<28} {1e3 * result[f'{name}_median_s']:>10.2f} "
                f"{1e3 * result[f'{name}_min_s']:>8.2f} {result[f'{name}_pixels_per_s'] / 1e6:>10.1f} "
                f"{ratio:>15.2f}x"
            )
        if not result["matrices_agree"]:
            print(f"WARNING: on {device.type} the confusion matrices of unetseg and torchmetrics differ")

    cpu = per_device["cpu"]
    summary = {
        "benchmark": "metrics.update",
        "device": "cpu",
        "shape": [args.batch, args.height, args.width],
        "input": input_kind,
        "num_classes": args.classes,
        "pixels": pixels,
        "pixels_per_s": cpu["unetseg_pixels_per_s"],
        "torchmetrics_pixels_per_s": cpu["torchmetrics_pixels_per_s"],
        "torchmetrics_no_validation_pixels_per_s": cpu["torchmetrics_no_validation_pixels_per_s"],
        "speedup_vs_torchmetrics": cpu["unetseg_pixels_per_s"] / cpu["torchmetrics_pixels_per_s"],
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__,
        "devices": per_device,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
