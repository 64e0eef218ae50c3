#!/usr/bin/env bash
# Two gloo processes on one CPU machine (DDP without GPUs), one thread each.
# Extra arguments go to unetseg.train.
#   bash launch/cpu_ddp.sh --max-steps 100
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec accelerate launch --config_file launch/cpu_ddp.yaml --main_process_port "${PORT:-29500}" -m unetseg.train "$@"
