#!/usr/bin/env bash
# Training throughput of this checkout against a baseline checkout, side by side: the
# same data, recipe and seed, runs alternated (base, this, base, this, ...) so that a
# machine that speeds up or slows down during the session affects both alike. Prints
# each run's median images/s (the first log line, which holds start-up, left out) and
# final val mIoU, then one JSON line with the medians and their ratio.
#
#   git worktree add /tmp/base 3b55f7d          # or any checkout whose unetseg/ is the baseline
#   BASE=/tmp/base bash benchmarks/ab_train.sh --data shards/camvid --config configs/camvid_gpu.yaml \
#       --max-steps 300 --eval-every 300 --log-every 25
#
# BASE: the baseline checkout (required). ROUNDS: runs per side (default 2). PYTHON: the
# interpreter (default python3). OUT: where the logs and run dirs go (default ab-out).
# Every argument is passed to `python -m unetseg.train` on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to the baseline checkout (a folder holding unetseg/)}"
ROUNDS=${ROUNDS:-2}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-ab-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
here=$(pwd)
base=$(cd "$BASE" && pwd)

for round in $(seq 1 "$ROUNDS"); do
  for side in base this; do
    tree=$here
    [ "$side" = base ] && tree=$base
    run="$OUT/$side-$round"
    rm -rf "$run"
    # -P: no current folder at the front of sys.path, or `python -m` would import this
    # checkout's unetseg on both sides (it did before this check existed).
    found=$(PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -P -c 'import unetseg, os; print(os.path.dirname(os.path.dirname(os.path.realpath(unetseg.__file__))))')
    if [ "$found" != "$(cd "$tree" && pwd -P)" ]; then
      echo "the $side side would import unetseg from $found, not from $tree" >&2
      exit 1
    fi
    PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -P -m unetseg.train --output-dir "$run" --tracker none "$@" > "$run.log" 2>&1 \
      || { echo "$side run $round failed: see $run.log" >&2; tail -n 20 "$run.log" >&2; exit 1; }
  done
done

"$PYTHON" - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
medians = {"base": [], "this": []}
for r in range(1, rounds + 1):
    for side in ("base", "this"):
        rows = [json.loads(line) for line in (out / f"{side}-{r}" / "metrics.jsonl").read_text().splitlines()]
        rates = [row["images_per_s"] for row in rows if "images_per_s" in row]
        rates = rates[1:] or rates
        evals = [row["mIoU"] for row in rows if "mIoU" in row]
        medians[side].append(statistics.median(rates))
        print(f"{side} run {r}: median {medians[side][-1]:.1f} images/s over {len(rates)} logs, "
              f"final val mIoU {100 * evals[-1]:.2f}" if evals else "no evaluation")
base, this = statistics.median(medians["base"]), statistics.median(medians["this"])
print(json.dumps({"base_images_per_s": round(base, 1), "this_images_per_s": round(this, 1),
                  "this_over_base": round(this / base, 3)}))
EOF
