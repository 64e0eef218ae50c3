#!/usr/bin/env bash
# Every local GPU (DDP over NCCL), bf16, with ../accelerate_config.yaml.
# Extra arguments go to unetseg.train; --batch-size is per GPU.
#   bash launch/multi_gpu.sh --data shards/camvid --epochs 100
set -euo pipefail
cd "$(dirname "$0")/.."
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$gpus" -lt 2 ]; then
    echo "multi_gpu.sh: found $gpus GPU(s); use launch/single_gpu.sh for one" >&2
    exit 1
fi
exec accelerate launch --config_file accelerate_config.yaml --num_processes "$gpus" -m unetseg.train "$@"
