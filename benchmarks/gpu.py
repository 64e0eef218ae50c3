"""U-Net training throughput by precision, memory format and batch size, against the loader.

    python benchmarks/gpu.py --data shards/camvid            # on a GPU machine
    python benchmarks/gpu.py --device cpu --size 64,96 --batch-sizes 2 --steps 2 --warmup 1 \
        --data shards/camvid --loader-batches 2                # a quick check that it runs
    python benchmarks/gpu.py --data shards/camvid --batch-sizes 8,16,32 --workers 4,12 \
        --augment-on workers,device --e2e-steps 300                    # the full sweep, on a GPU

Part 1, the model: one training step (forward, cross-entropy, backward, AdamW step) of
unetseg's U-Net on random in-memory batches of the given size (default: the crop size of
``--e2e-config``, 352x480 for the GPU recipe), for each precision (fp32; bf16 autocast, the way Accelerate runs
``--mixed-precision bf16``), each memory format (contiguous, the baseline, and
channels_last, which ``unetseg.train`` uses on CUDA) and each batch size. Reports
images/s, the ratio to fp32 contiguous at the same batch size, and peak memory. A
configuration that runs out of memory is reported as such and the sweep goes on.

Part 2, the loader (with ``--data``): the training stream with the GPU recipe's
augmentation (random scale 0.5-2.0, crops of ``--size``, flips, colour jitter) over
``--workers`` worker processes, in images/s, set against the best model figure: if the
loader is slower, training on this machine is input-bound and that is its ceiling. Each
worker count is timed twice: augmenting in the workers (``augment_on: workers``), and
with the workers only decoding while the device augments (``augment_on: device``; the
batches go through the training batch hook on ``--device``, synchronised per batch).

Part 3, the model compiled (``--compile``, default on for CUDA): the best bf16
configuration's step under ``torch.compile``, and the FLOPs of one image's forward and
backward pass (counted with ``torch.utils.flop_counter`` on the meta device, so free),
hence the model FLOP utilisation (MFU) against ``--peak-tflops`` (default: 790 for an
H100/H200 in bf16, else not reported).

Part 4, end to end (``--e2e-steps N``): ``python -m unetseg.train`` with ``--e2e-config``
(default the GPU recipe) for N steps at each ``--workers`` count and each ``augment_on``,
the median of its logged images/s (the first log, which holds start-up and compilation,
left out).

By default it measures what answers the throughput question and no more: batch 16 (the
recipe's), fp32 and bf16, contiguous and channels_last, the best bf16 one compiled, 4
loader workers and end-to-end training with augmentation where training puts it
(``--augment-on auto``); ``--batch-sizes 8,16,32 --workers 4,12 --augment-on
workers,device`` is the full sweep.

Prints tables and a JSON line after each part (``"part"``: ``model``, ``loader``, then
``all`` last, the whole run's), so a run cut short keeps what it finished: one JSON object (``images_per_s`` keyed by configuration,
``baseline_images_per_s`` for fp32 contiguous at the largest batch size that fits,
``best``, ``model_images_per_s`` (the compiled rate when compiled, else the best eager
one), ``loader_images_per_s`` and ``bound`` (the loader against ``model_images_per_s``) at the first ``--workers`` count with
augmentation where ``auto`` puts it for ``--device``, ``loader_by_setting``,
``flops_per_image``, ``compiled_model_images_per_s``, ``e2e_images_per_s`` at the first
``--workers`` count (augmentation as ``auto`` puts it), ``e2e_by_setting``,
``e2e_over_model`` (against the compiled model when there is one) and ``mfu`` of that
end-to-end rate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from unetseg.models.unet import UNet, UNetConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(device: torch.device, *, width: int, depth: int, classes: int, batch: int, size: tuple[int, int],
              precision: str, channels_last: bool, steps: int, warmup: int,
              compile: bool = False) -> tuple[float, float | None]:
    """Images/s of the training step, and peak GPU memory in GiB (None on the CPU)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(num_classes=classes, width=width, depth=depth)).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    model = torch.compile(net) if compile else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, *size, device=device, generator=g).contiguous(memory_format=memory_format)
    masks = torch.randint(0, classes, (batch, *size), device=device, generator=g)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    rate = steps * batch / (time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in {precision}, channels_last={channels_last}, batch {batch}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return rate, peak


def flops_per_image(*, width: int, depth: int, classes: int, size: tuple[int, int]) -> float:
    """FLOPs of one image's forward and backward pass, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(UNetConfig(num_classes=classes, width=width, depth=depth))
        x, y = torch.randn(1, 3, *size), torch.randint(0, classes, (1, *size))
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The end-to-end runs' environment: this checkout first on ``PYTHONPATH``, then what the
    caller had there (a GPU machine may keep our dependencies in a side folder on it)."""
    environ = dict(os.environ if environ is None else environ)
    kept = environ.get("PYTHONPATH")
    repo = str(Path(__file__).resolve().parents[1])
    return {**environ, "PYTHONPATH": repo + (os.pathsep + kept if kept else "")}


def model_size(size: str | None, config: str) -> tuple[int, int]:
    """``--size``, or the crops the end-to-end config trains on (the GPU recipe's 352x480),
    so that the model is timed on the shapes training feeds it."""
    from unetseg.config import TrainConfig
    from unetseg.options import size_pair

    if size is None and Path(config).is_file():
        size = TrainConfig.load(config).data.crop_size
    return size_pair(size if size is not None else "360,480", "--size")


def e2e_rate(config: str, data: str, workers: int, steps: int, extra: list[str], augment_on: str) -> float:
    """Median logged images/s of ``python -m unetseg.train`` for ``steps`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "unetseg.train", "--config", config, "--data", data, "--num-workers", str(workers),
               "--max-steps", str(steps), "--eval-every", str(steps), "--log-every", str(max(1, steps // 10)),
               "--warmup-steps", "0", "--tracker", "none", "--augment-on", augment_on, "--output-dir", str(run), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if result.returncode != 0:
            raise SystemExit(f"end-to-end training failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return statistics.median(rates[1:] or rates)


def loader_rate(data: str, size: tuple[int, int], batch: int, workers: int, num: int, warmup: int,
                augment_on: str, device: torch.device) -> float:
    """Images/s of the training stream as training consumes it: through the batch hook on
    ``device`` (which augments when ``augment_on`` is ``device``), synchronised per batch."""
    from loader import rate  # benchmarks/loader.py, beside this file

    from unetseg.augment import DeviceAugment, TrainTransform, TrainTransformConfig
    from unetseg.badsamples import StreamStats
    from unetseg.batch import BatchHook
    from unetseg.loaders import iterate, make_loader
    from unetseg.sources import open_source
    from unetseg.stream import TrainStream, batches_per_epoch

    source = open_source(data, "train")
    tf = TrainTransform(TrainTransformConfig(crop_size=size, scale_range=(0.5, 2.0), jitter=0.2),
                        source.info.classes.ignore_label)
    stream = TrainStream(source, tf, batch, batches_per_epoch=batches_per_epoch(source.num_samples or 1000, batch, 1),
                         augment_on=augment_on)
    hook = BatchHook(device, channels_last=device.type == "cuda", steps=[DeviceAugment(tf)])

    def consumed():
        for b in iterate(make_loader(stream, workers, pin_memory=device.type == "cuda"), StreamStats()):
            out = hook(b)
            sync(device)
            yield out

    return rate(consumed(), batch, num, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default=None, help="H,W of the training batches (default: the crop size of "
                        "--e2e-config, else 360,480)")
    parser.add_argument("--batch-sizes", default="16", help="e.g. 8,16,32 for a sweep (default: the recipe's 16)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", help="shard folder for the loader part (skipped without it)")
    parser.add_argument("--workers", default=None,
                        help="loader worker counts, e.g. 4,12 (default: 4, at most the cores)")
    parser.add_argument("--augment-on", default="auto",
                        help="where the loader and end-to-end parts augment: auto (where training puts it on "
                             "--device), workers, device, or workers,device for both")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="time the best bf16 configuration compiled too (auto: on for CUDA)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, for MFU "
                        "(default: 790 on an H100/H200)")
    parser.add_argument("--e2e-steps", type=int, default=0, help="steps of real training per worker count (0: skip)")
    parser.add_argument("--e2e-config", default="configs/camvid_gpu.yaml")
    parser.add_argument("--e2e-args", default="", help="more unetseg.train arguments for the end-to-end runs")
    parser.add_argument("--loader-batch-size", type=int, default=16)
    parser.add_argument("--loader-batches", type=int, default=40)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = model_size(args.size, args.e2e_config)
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [min(4, cores)]
    peak_tflops = args.peak_tflops
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
        if peak_tflops is None and any(chip in name for chip in ("H100", "H200")):
            peak_tflops = 790.0
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"U-Net width {args.width} depth {args.depth}, {args.classes} classes, {size[0]}x{size[1]}, "
          f"{args.steps} timed steps after {args.warmup}; {name}; torch {torch.__version__}")

    rows: list[dict] = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for precision in args.precisions.split(","):
            for channels_last in (False, True):
                row = {"batch": batch, "precision": precision, "channels_last": channels_last}
                try:
                    row["images_per_s"], row["peak_gib"] = step_rate(
                        device, width=args.width, depth=args.depth, classes=args.classes, batch=batch, size=size,
                        precision=precision, channels_last=channels_last, steps=args.steps, warmup=args.warmup)
                except torch.OutOfMemoryError:
                    row["images_per_s"], row["peak_gib"] = None, None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)

    def key(r: dict) -> str:
        return f"{r['precision']}{'_cl' if r['channels_last'] else ''}_b{r['batch']}"

    base = {r["batch"]: r["images_per_s"] for r in rows if r["precision"] == "fp32" and not r["channels_last"]}
    print(f"\n{'batch':>5}  {'precision':<9} {'memory':<14} {'images/s':>9} {'vs fp32':>8} {'peak GiB':>9}")
    for r in rows:
        rate, ref = r["images_per_s"], base.get(r["batch"])
        ratio = f"{rate / ref:.2f}x" if rate and ref else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        shown = f"{rate:.1f}" if rate else "OOM"
        print(f"{r['batch']:>5}  {r['precision']:<9} {'channels_last' if r['channels_last'] else 'contiguous':<14} "
              f"{shown:>9} {ratio:>8} {peak:>9}")
    fitted = [r for r in rows if r["images_per_s"]]
    if not fitted:
        raise SystemExit("every configuration ran out of memory: try smaller --batch-sizes or --size")
    best = max(fitted, key=lambda r: r["images_per_s"])
    baseline_batch = max((b for b, v in base.items() if v), default=None)
    result = {
        "device": name, "size": list(size), "width": args.width, "depth": args.depth,
        "images_per_s": {key(r): round(r["images_per_s"], 1) if r["images_per_s"] else None for r in rows},
        "peak_gib": {key(r): round(r["peak_gib"], 2) for r in rows if r["peak_gib"] is not None},
        "baseline_images_per_s": round(base[baseline_batch], 1) if baseline_batch else None,
        "best": key(best), "best_images_per_s": round(best["images_per_s"], 1),
    }
    if baseline_batch:
        print(f"\nbest: {key(best)} at {best['images_per_s']:.1f} images/s, "
              f"{best['images_per_s'] / base[baseline_batch]:.2f}x fp32 contiguous at batch {baseline_batch}")

    flops = flops_per_image(width=args.width, depth=args.depth, classes=args.classes, size=size)
    model_rate = best["images_per_s"]
    compiled_rate = None
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        top = max((r for r in fitted if r["precision"] == "bf16"), key=lambda r: r["images_per_s"], default=best)
        compiled_rate, _ = step_rate(device, width=args.width, depth=args.depth, classes=args.classes,
                                     batch=top["batch"], size=size, precision=top["precision"],
                                     channels_last=top["channels_last"], steps=args.steps, warmup=args.warmup + 3,
                                     compile=True)
        model_rate = max(model_rate, compiled_rate)
        print(f"compiled: {key(top)} at {compiled_rate:.1f} images/s, {compiled_rate / top['images_per_s']:.2f}x eager")
    def mfu(rate: float) -> float | None:
        return rate * flops / (peak_tflops * 1e12) if peak_tflops else None

    print(f"{flops / 1e9:.3g} GFLOP per image (forward + backward)"
          + (f"; model-only MFU {100 * mfu(model_rate):.1f}% of {peak_tflops:.0f} TFLOP/s" if peak_tflops else ""))
    result.update(flops_per_image=flops, compiled_model_images_per_s=round(compiled_rate, 1) if compiled_rate else None,
                  model_images_per_s=round(model_rate, 1), model_mfu=mfu(model_rate))
    part("model", result)

    if args.data:
        from unetseg.augment import augment_on

        auto = augment_on("auto", device)
        places = [auto if p == "auto" else p for p in args.augment_on.split(",")]
        settings = [(w, where) for w in workers for where in dict.fromkeys(places)]
        loaders = {(w, where): loader_rate(args.data, size, args.loader_batch_size, w, args.loader_batches,
                                           max(2, w), where, device) for w, where in settings}
        for (w, where), loader in loaders.items():
            print(f"loader, augmentation in {where}: {loader:.1f} images/s with {w} workers (batch "
                  f"{args.loader_batch_size}, {size[0]}x{size[1]} crops) = {loader / model_rate:.2f}x the model rate")
        loader = loaders[workers[0], places[0]]
        bound = "loader" if loader < model_rate else "model"  # the compiled rate when there is one
        result.update(loader_images_per_s=round(loader, 1), loader_workers=workers[0], loader_augment_on=places[0],
                      bound=bound, loader_by_setting={f"{where}_w{w}": round(v, 1) for (w, where), v in loaders.items()})
        part("loader", result)
        if args.e2e_steps:
            e2e = {(w, where): e2e_rate(args.e2e_config, args.data, w, args.e2e_steps, args.e2e_args.split(), where)
                   for w, where in settings}
            for (w, where), rate in e2e.items():
                print(f"end to end, augmentation in {where}: {rate:.1f} images/s with {w} workers = "
                      f"{rate / model_rate:.2f}x the model rate" + (f", MFU {100 * mfu(rate):.1f}%" if peak_tflops else ""))
            rate = e2e[workers[0], places[0]]
            result.update(e2e_images_per_s=round(rate, 1), e2e_augment_on=places[0],
                          e2e_by_setting={f"{where}_w{w}": round(v, 1) for (w, where), v in e2e.items()},
                          e2e_over_model=round(rate / model_rate, 3), mfu=mfu(rate))
    part("all", result)


def part(name: str, result: dict) -> None:
    """One JSON line of what is measured so far, as soon as a part ends: a run cut short by
    its time limit still leaves the parts it finished (the last line is the whole run's)."""
    print(json.dumps({"part": name, **result}), flush=True)


if __name__ == "__main__":
    main()
