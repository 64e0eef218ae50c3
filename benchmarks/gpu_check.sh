#!/usr/bin/env bash
# The GPU path checked within a lent machine's budget, in one call (about 8 minutes):
#  1. a smoke (about 2 minutes): imports; the device augmentation against the same batch
#     augmented in the loader workers; STEPS_SMOKE steps (default 300) of the GPU recipe under
#     TORCH_LOGS=recompiles,graph_breaks, with 4 workers and two validations;
#  2. the throughput question: benchmarks/gpu.py (bf16, batch 16, the best one compiled, the
#     stream at 4 workers augmenting on the device), end to end against the compiled model
#     alone, and MFU. The end-to-end figure is the smoke's (same recipe, workers and
#     augmentation) unless E2E_STEPS > 0 asks gpu.py for its own runs;
#  3. what time is left: the GPU recipe for as many steps as fit (whole EVAL_EVERY intervals,
#     default 1000, at most RECIPE_STEPS, default 8000, the 3b55f7d run's schedule), val mIoU
#     at each evaluation.
# Each part appends a JSON line to $OUT/check.jsonl as soon as it ends (logs beside it), so
# a cut keeps what finished; a part that fails is reported and the next one still runs.
#   bash benchmarks/gpu_check.sh
# BUDGET_S: seconds for the whole check (default 480); every part runs under what is left.
# DATA: shard folder (default shards/camvid), packed from CAMVID (default
# ../shared/data/camvid) when it has no dataset.json. OUT: default gpu-check-out. PYTHON:
# default python3. CONFIG: default configs/camvid_gpu.yaml. RUN: keep part 3's run folder
# there (default: a temporary one, deleted). GPU_ARGS / TRAIN_ARGS: extra arguments for
# benchmarks/gpu.py / unetseg.train (tests/test_gpu_check.py runs this on a CPU with tiny ones).
# Where this Python cannot import unetseg's dependencies and WHEELS (default .whl) holds wheels
# (benchmarks/gpu_wheels.sh), they are installed into a temporary folder put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
deadline=$((start + BUDGET_S))
OUT=${OUT:-gpu-check-out}
DATA=${DATA:-shards/camvid}
CAMVID=${CAMVID:-../shared/data/camvid}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/camvid_gpu.yaml}
STEPS_SMOKE=${STEPS_SMOKE:-300}
E2E_STEPS=${E2E_STEPS:-0}
RECIPE_STEPS=${RECIPE_STEPS:-8000}
EVAL_EVERY=${EVAL_EVERY:-1000}
WHEELS=${WHEELS:-.whl}
read -r -a gpu_args <<< "${GPU_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$OUT"
: > "$OUT/check.jsonl"  # this call's results only
export PYTHONUNBUFFERED=1

{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "no nvidia-smi: no NVIDIA GPU here, so every figure is a CPU figure"
  fi
  echo "$(nproc --all) CPU cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT/machine.txt"
if ! "$PYTHON" benchmarks/check_imports.py > /dev/null 2>&1 && compgen -G "$WHEELS/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl || {
    echo "error: $PYTHON cannot install the wheels of $WHEELS (see above). Fix: download them for this Python:" \
      "PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') bash benchmarks/gpu_wheels.sh" >&2
    exit 1
  }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed the wheels of $WHEELS into $site, on PYTHONPATH" | tee -a "$OUT/machine.txt"
fi
"$PYTHON" benchmarks/check_imports.py | tee -a "$OUT/machine.txt"  # stops here, naming what is missing
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/machine.txt"

if [ ! -f "$DATA/dataset.json" ]; then
  [ -d "$CAMVID/images" ] || {
    echo "error: $DATA has no dataset.json and $CAMVID/images does not exist. Fix: set DATA to packed CamVid" \
      "shards (carry shards/camvid to a lent machine) or CAMVID to the CamVid folder (images/, masks/, classes.json)." >&2
    exit 2
  }
  "$PYTHON" -m unetseg pack --images "$CAMVID/images" --masks "$CAMVID/masks" --classes "$CAMVID/classes.json" \
    --out "$DATA" --workers "$(nproc --all)"
fi

recipe=(--config "$CONFIG" --data "$DATA")
failed=()
part() {  # part NAME COMMAND...: run one part; a failure is recorded and the check goes on
  local name=$1
  shift
  echo "== $name ($(( $(date +%s) - start )) s of $BUDGET_S)"
  "$@" || failed+=("$name")
}
check() { "$PYTHON" benchmarks/gpu_check.py "$1" --out "$OUT" --deadline "$deadline" "${@:2}"; }

part augment check augment -- "${recipe[@]}" --num-workers 0 "${train_args[@]}"
part smoke check smoke --steps "$STEPS_SMOKE" -- "${recipe[@]}" "${train_args[@]}"
part throughput check throughput -- --data "$DATA" --e2e-config "$CONFIG" --precisions bf16 --workers 4 \
  --augment-on device --e2e-steps "$E2E_STEPS" "${gpu_args[@]}"
part recipe check recipe --max-steps "$RECIPE_STEPS" --eval-every "$EVAL_EVERY" ${RUN:+--run "$RUN"} \
  -- "${recipe[@]}" "${train_args[@]}"

echo "total $(( $(date +%s) - start )) s of $BUDGET_S; results in $OUT/check.jsonl"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (each part's line in $OUT/check.jsonl and its log in $OUT say why)" >&2
  exit 1
fi
