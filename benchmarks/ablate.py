"""One change at a time against the same baseline and seed: train each variant, then print
a markdown table of val mIoU, the change against the baseline, per-class IoU and time.

    python benchmarks/ablate.py --out runs/ablate \\
        --variant "lovasz=--loss ce+dice+lovasz" --variant "residual=--model-block residual" \\
        -- --config configs/camvid_cpu.yaml --max-steps 800 --eval-every 800

The baseline is ``python -m unetseg.train TRAIN_ARGS --output-dir OUT/baseline``; each
variant ``NAME=ARGS`` appends ARGS (split like a shell line) and trains into ``OUT/NAME``.
Runs go one after the other, so they share the cores fairly; a finished run (one with a
``final/`` folder) is read again, not retrained, so adding a variant costs one run. With
``--seeds`` every run is repeated per seed and the table shows the mean (and the spread of
the baseline, the yardstick for whether a difference is a difference); a variant
``"seed_1=--seed 1"`` is the cheap yardstick: the baseline again with another seed.

The last line is one JSON object: per run, the seeds' final mIoU, per-class IoU and
training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
from pathlib import Path

from seeds import evaluations, parse, spread, train


def summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = evaluations(run_dir)
    if not evals:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no evaluation")
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    wall = run_dir / "wall_s.txt"
    return {"miou": evals[-1]["mIoU"],
            "per_class": {c: v["iou"] for c, v in evals[-1].get("per_class", {}).items()},
            "images_per_s": statistics.median(rates) if rates else None,
            "wall_s": float(wall.read_text()) if wall.exists() else None}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or not name or "/" in name or name == "baseline":
        raise SystemExit(f"--variant {text!r}: write NAME=ARGS, e.g. \"residual=--model-block residual\" "
                         "(NAME without '/', not 'baseline')")
    return name, shlex.split(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s [--variant NAME=ARGS ...] [--seeds 0] [--out DIR] -- TRAIN_ARGS")
    parser.add_argument("--variant", action="append", default=[], help="NAME=ARGS appended to the baseline's arguments")
    args, base_args, seeds, env = parse(parser, "0", "runs/ablate")
    variants = [("baseline", [])] + [parse_variant(v) for v in args.variant]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    results: dict[str, list[dict]] = {}
    for name, extra in variants:
        results[name] = []
        for seed in seeds:
            run_dir = Path(args.out) / (name if len(seeds) == 1 else f"{name}/seed-{seed}")
            train(run_dir, [*base_args, "--seed", str(seed), *extra], env)
            results[name].append(summary(run_dir))

    def mean(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.mean(values) if values else None

    classes = list(results["baseline"][0]["per_class"])
    base = mean(results["baseline"], "miou")
    print(f"baseline: {shlex.join(base_args)}; seeds {args.seeds}"
          + (f"; baseline spread (std) {100 * spread([r['miou'] for r in results['baseline']]):.2f}" if len(seeds) > 1 else ""))
    print("| change | val mIoU | vs baseline | " + " | ".join(classes) + " | images/s | wall min |")
    print("|---|---|---|" + "---|" * len(classes) + "---|---|")
    for name, extra in variants:
        rows = results[name]
        per_class = []
        for c in classes:
            values = [r["per_class"].get(c) for r in rows if r["per_class"].get(c) is not None]
            per_class.append(f"{100 * statistics.mean(values):.1f}" if values else "-")
        miou, rate, wall = mean(rows, "miou"), mean(rows, "images_per_s"), mean(rows, "wall_s")
        label = "baseline" if name == "baseline" else f"{name}: `{shlex.join(extra)}`"
        delta = "" if name == "baseline" else f"{100 * (miou - base):+.2f}"
        print(f"| {label} | {100 * miou:.2f} | {delta} | " + " | ".join(per_class)
              + f" | {rate:.1f} | " + (f"{wall / 60:.1f}" if wall else "-") + " |")
    print(json.dumps({"baseline_args": base_args, "seeds": seeds,
                      "runs": {name: {"args": extra, "results": results[name]} for name, extra in variants}}))


if __name__ == "__main__":
    main()
