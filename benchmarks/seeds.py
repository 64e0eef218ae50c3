"""A recipe's val mIoU as the mean over seeds, with the spread: one number from one seed
moves by a point or more on 101 CamVid val images, which is as large as most changes
worth trying.

    python benchmarks/seeds.py --seeds 0,1,2 --out runs/seeds -- --config configs/camvid_cpu.yaml

Runs ``python -m unetseg.train ARGS --seed S --output-dir OUT/seed-S`` for each seed, one
after the other (an existing finished run is read, not trained again: rerun to add seeds),
then prints each seed's final and best val mIoU, their mean and sample standard
deviation, and the per-class IoU means. The last line is one JSON object with
``final_miou_mean``, ``final_miou_std``, ``best_miou_mean``, ``per_seed`` and
``per_class_mean``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def evaluations(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "mIoU" in r]


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def parse(parser: argparse.ArgumentParser, seeds: str, out: str) -> tuple[argparse.Namespace, list[str], list[int], dict]:
    """Add ``--seeds``, ``--out`` and the training arguments after ``--``; returns the
    parsed options, the training arguments, the seeds and the environment of the runs
    (this checkout's unetseg first)."""
    parser.add_argument("--seeds", default=seeds, help=f"comma-separated seeds (default {seeds})")
    parser.add_argument("--out", default=out, help="parent folder of the runs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for python -m unetseg.train, after --")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return args, train_args, [int(s) for s in args.seeds.split(",")], env


def train(run_dir: Path, train_args: list[str], env: dict) -> None:
    """``python -m unetseg.train TRAIN_ARGS --output-dir RUN_DIR`` unless that run is
    finished (an interrupted one continues); its wall time goes to ``RUN_DIR/wall_s.txt``."""
    if (run_dir / "final").is_dir():
        return
    cmd = [sys.executable, "-m", "unetseg.train", *train_args, "--output-dir", str(run_dir)]
    if run_dir.exists():
        cmd += ["--resume", "auto"]
    print(f"training {run_dir}: {shlex.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{run_dir} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s [--seeds 0,1,2] [--out DIR] -- TRAIN_ARGS")
    args, train_args, seeds, env = parse(parser, "0,1,2", "runs/seeds")
    per_seed = {}
    for seed in seeds:
        run_dir = Path(args.out) / f"seed-{seed}"
        train(run_dir, [*train_args, "--seed", str(seed)], env)
        evals = evaluations(run_dir)
        if not evals:
            raise SystemExit(f"{run_dir}/metrics.jsonl has no evaluation")
        per_seed[seed] = {"final": evals[-1]["mIoU"], "best": max(e["mIoU"] for e in evals),
                          "per_class": evals[-1].get("per_class", {})}

    finals = [v["final"] for v in per_seed.values()]
    bests = [v["best"] for v in per_seed.values()]
    classes = list(next(iter(per_seed.values()))["per_class"])
    # A class absent from val and never predicted has no IoU (None): averaged over the seeds that have one.
    per_class = {}
    for c in classes:
        values = [v["per_class"][c]["iou"] for v in per_seed.values() if v["per_class"][c]["iou"] is not None]
        per_class[c] = statistics.mean(values) if values else None
    print(f"{'seed':>6} {'final mIoU':>11} {'best mIoU':>10}")
    for seed, v in per_seed.items():
        print(f"{seed:>6} {100 * v['final']:>11.2f} {100 * v['best']:>10.2f}")
    print(f"{'mean':>6} {100 * statistics.mean(finals):>11.2f} {100 * statistics.mean(bests):>10.2f}   "
          f"(std {100 * spread(finals):.2f} / {100 * spread(bests):.2f} over {len(seeds)} seeds)")
    print("per-class IoU, mean over seeds: "
          + ", ".join(f"{c} {100 * v:.1f}" if v is not None else f"{c} -" for c, v in per_class.items()))
    print(json.dumps({
        "seeds": seeds, "final_miou_mean": statistics.mean(finals), "final_miou_std": spread(finals),
        "best_miou_mean": statistics.mean(bests), "best_miou_std": spread(bests),
        "per_seed": {str(s): {"final": v["final"], "best": v["best"]} for s, v in per_seed.items()},
        "per_class_mean": per_class,
    }))


if __name__ == "__main__":
    main()
