"""unetseg's training loop against a plain PyTorch loop, same model, batch and in-memory data.

    python benchmarks/train_step.py

Both train the same U-Net with AdamW and cross-entropy on the same in-memory batches
for the same number of steps. unetseg's loop is `unetseg.train.train` with the batches
handed in (no stream): Accelerate, the fused AdamW that skips a non-finite step on the
device, the agreed non-finite/stop check (one tiny all-reduce per optimiser step, none in
one process), the schedule, logging and a
checkpoint at the end (excluded: images/s comes from its metrics.jsonl, which leaves
evaluation and saving out). Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def batches(n: int, batch_size: int, size: int, classes: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch_size, 3, size, size, generator=g),
             "mask": torch.randint(0, classes, (batch_size, size, size), generator=g)} for _ in range(n)]


def plain(data, steps: int, warmup: int, width: int, depth: int, classes: int, lr: float) -> float:
    from unetseg.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=classes, width=width, depth=depth))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    it = itertools.cycle(data)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(it)
        loss = F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * data[0]["image"].shape[0] / (time.perf_counter() - start)


def unetseg_loop(data, steps: int, warmup: int, width: int, depth: int, lr: float, folder: Path) -> float:
    from unetseg.flags import build_config
    from unetseg.synth import synth
    from unetseg.train import train

    size = data[0]["image"].shape[-1]
    synth(folder / "data", train=8, val=2, size=f"{size}x{size}", workers=1, progress=False)  # classes and a val split
    config = build_config(None, {
        "data": str(folder / "data"), "output-dir": str(folder / "run"), "max-steps": str(warmup + steps),
        "log-every": str(warmup), "eval-every": str(warmup + steps), "model-width": str(width),
        "model-depth": str(depth), "lr": str(lr), "tracker": "none", "num-workers": "0", "batch-size": str(len(data[0]["image"])),
    })
    train(config, batches=itertools.cycle(data))
    logs = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in logs if "images_per_s" in r and r["step"] > warmup]
    # Each log line covers the `warmup` steps before it; weight them by their steps.
    return sum(r["images_per_s"] for r in timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    classes, lr = 10, 2e-3
    data = batches(4, args.batch_size, args.size, classes)
    with tempfile.TemporaryDirectory() as tmp:
        ours = unetseg_loop(data, args.steps, args.warmup, args.width, args.depth, lr, Path(tmp))
    base = plain(data, args.steps, args.warmup, args.width, args.depth, classes, lr)
    print(f"U-Net width {args.width} depth {args.depth}, batch {args.batch_size} x {args.size}x{args.size}, "
          f"{args.steps} timed steps after {args.warmup}, {torch.get_num_threads()} threads")
    print(f"{'loop':<22}{'images/s':>10}{'vs plain':>10}")
    print(f"{'unetseg.train':<22}{ours:>10.1f}{ours / base:>9.2f}x")
    print(f"{'plain PyTorch':<22}{base:>10.1f}{1:>9.2f}x")
    print(json.dumps({"images_per_s": round(ours, 2), "plain_images_per_s": round(base, 2),
                      "ratio": round(ours / base, 3), "batch_size": args.batch_size, "size": args.size,
                      "width": args.width, "depth": args.depth, "steps": args.steps}))


if __name__ == "__main__":
    main()
