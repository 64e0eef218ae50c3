"""DDP scaling on the CPU: 1 process x 1 thread against 2 processes x 1 thread.

    python benchmarks/ddp_scaling.py

Both run `unetseg.train` through `accelerate launch` on the same synthetic shards with
the same per-process batch, for the same number of steps; images/s (all processes
together, evaluation and saving left out) comes from each run's metrics.jsonl. Each
process gets one thread and one loader worker, so two processes use the two cores.
Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, data: Path, out: Path, args: argparse.Namespace) -> float:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if nproc > 1:
        launcher.append("--multi_gpu")
    steps = args.warmup + args.steps
    cmd = [*launcher, "-m", "unetseg.train", "--data", str(data), "--output-dir", str(out), "--tracker", "none",
           "--max-steps", str(steps), "--log-every", str(args.warmup), "--eval-every", str(steps),
           "--batch-size", str(args.batch_size), "--num-workers", "1", "--model-width", str(args.width)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed:\n{result.stderr[-3000:]}")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["images_per_s"] for r in logs if "images_per_s" in r and r["step"] > args.warmup]
    return sum(timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    from unetseg.synth import synth

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth(data, train=512, val=16, size=args.size, progress=False)
        one = run(1, data, Path(tmp) / "one", args)
        two = run(2, data, Path(tmp) / "two", args)
    efficiency = two / (2 * one)
    print(f"unetseg.train on {args.size} synthetic images, batch {args.batch_size} per process, width {args.width}, "
          f"{args.steps} timed steps after {args.warmup}; 1 thread and 1 loader worker per process")
    print(f"{'processes':<12}{'images/s':>10}{'speed-up':>10}")
    print(f"{1:<12}{one:>10.1f}{1:>9.2f}x")
    print(f"{2:<12}{two:>10.1f}{two / one:>9.2f}x")
    print(f"scaling efficiency {efficiency:.2f}")
    print(json.dumps({"one_process_images_per_s": round(one, 2), "two_process_images_per_s": round(two, 2),
                      "efficiency": round(efficiency, 3), "batch_size": args.batch_size, "size": args.size}))


if __name__ == "__main__":
    main()
