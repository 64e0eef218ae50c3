#!/usr/bin/env bash
# Everything worth knowing about one GPU machine, in under 8 minutes on an H100/H200:
#  1. U-Net (width 32) training-step throughput at the recipe's 352x480 crops: fp32 and
#     bf16, channels_last off and on, batch 16, peak memory, the best bf16 one compiled,
#     FLOPs per image and MFU (benchmarks/gpu.py; GPU_ARGS="--batch-sizes 8,16,32
#     --workers 4,12 --augment-on workers,device" for the full sweep);
#  2. the training stream's throughput at 4 workers, augmenting where training puts it on
#     a GPU (on the device), against the compiled model rate, and real training (the GPU
#     recipe, E2E_STEPS steps, default 300): is training here input-bound? gpu.py prints a
#     JSON line after each part, so a timeout keeps the parts that finished;
#  3. a short CamVid training with the GPU recipe (configs/camvid_gpu.yaml, 1000 steps):
#     end-to-end images/s and val mIoU.
# Run from anywhere:
#   bash benchmarks/gpu.sh
# DATA: shard folder (default shards/camvid), packed from CAMVID (default
# ../shared/data/camvid) when it has no dataset.json. OUT: where the logs go (default
# gpu-out). PYTHON: the interpreter (default python3); the checkout need not be installed.
# STEPS: training steps (default 1000); RUN: its run folder (default: a new temporary one). E2E_STEPS:
# steps of each end-to-end run of part 2 (default 300; 0 skips them). GPU_ARGS / TRAIN_ARGS: extra arguments for
# benchmarks/gpu.py / unetseg.train (tests/test_benchmarks.py runs the script on a CPU
# with tiny ones).
# Record what it prints, and the card, in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
DATA=${DATA:-shards/camvid}
CAMVID=${CAMVID:-../shared/data/camvid}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-1000}
E2E_STEPS=${E2E_STEPS:-300}
read -r -a gpu_args <<< "${GPU_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
else
  echo "no nvidia-smi: no NVIDIA GPU here, so every figure below is a CPU figure" | tee "$OUT/machine.txt"
fi
echo "$(nproc) CPU cores" | tee -a "$OUT/machine.txt"
"$PYTHON" benchmarks/check_imports.py | tee -a "$OUT/machine.txt"  # names what is missing, before any device time
"$PYTHON" -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/machine.txt"

if [ ! -f "$DATA/dataset.json" ]; then
  if [ ! -d "$CAMVID/images" ]; then
    echo "error: $DATA has no dataset.json and $CAMVID/images does not exist." >&2
    echo "Fix: set DATA to packed CamVid shards or CAMVID to the CamVid folder (images/, masks/, classes.json)." >&2
    exit 2
  fi
  "$PYTHON" -m unetseg pack --images "$CAMVID/images" --masks "$CAMVID/masks" --classes "$CAMVID/classes.json" \
    --out "$DATA" --workers "$(nproc)"
fi

echo "== 1-2. model throughput and loader throughput"
timeout 420 "$PYTHON" benchmarks/gpu.py --data "$DATA" --e2e-steps "$E2E_STEPS" "${gpu_args[@]}" 2>&1 | tee "$OUT/throughput.txt"

echo "== 3. short CamVid training: configs/camvid_gpu.yaml, $STEPS steps"
run=${RUN:-$(mktemp -d)/camvid-gpu-short}
timeout 240 "$PYTHON" -m unetseg.train --config configs/camvid_gpu.yaml --data "$DATA" --output-dir "$run" \
  --max-steps "$STEPS" --eval-every $((STEPS / 2)) --warmup-steps $((STEPS / 10)) --num-workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" \
  "${train_args[@]}" > "$OUT/train.log" 2>&1 || { echo "training failed: see $OUT/train.log" >&2; tail -n 20 "$OUT/train.log" >&2; exit 1; }
cp "$run/metrics.jsonl" "$OUT/train-metrics.jsonl"
grep -E "parameters|val mIoU" "$OUT/train.log" || true
"$PYTHON" - "$OUT/train-metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
rates = rates[1:] or rates  # the first includes start-up
evals = [r for r in rows if "mIoU" in r]
print(f"training: median {statistics.median(rates):.1f} images/s over {len(rates)} logs; "
      + "; ".join(f"val mIoU {100 * r['mIoU']:.2f} at step {r['step']}" for r in evals))
EOF
echo "total $((SECONDS - start)) s"
