#!/usr/bin/env bash
# One GPU, bf16. Extra arguments go to unetseg.train.
#   bash launch/single_gpu.sh --data shards/camvid --epochs 100
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file launch/single_gpu.yaml -m unetseg.train "$@"
