#!/usr/bin/env bash
# A short GPU check of the training loop and the metrics: run on a lent GPU machine
# (see docs/benchmarks.md). Writes its logs to $OUT (default ./gpu-out).
#   bash benchmarks/gpu_smoke.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/check_imports.py || exit 1  # names what is missing, before any device time
python3 -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/metrics.py --repeats 20 2>&1 | tee "$OUT/metrics.txt"
python3 -m unetseg synth --out /tmp/unetseg-syn --train 512 --val 128 --workers 8 2>&1 | tail -1
for mp in bf16 fp16 no; do
  timeout 120 python3 -m unetseg.train --data /tmp/unetseg-syn --output-dir "/tmp/run-$mp" --tracker none \
    --mixed-precision "$mp" --batch-size 32 --num-workers 8 --max-steps 120 --eval-every 60 --log-every 20 \
    > "$OUT/train-$mp.log" 2>&1
  echo "train $mp exit $?"
  grep -E "parameters|final val" "$OUT/train-$mp.log"
  cp "/tmp/run-$mp/metrics.jsonl" "$OUT/metrics-$mp.jsonl" 2>/dev/null
  tail -n 3 "/tmp/run-$mp/metrics.jsonl" 2>/dev/null | cut -c1-160
done
