#!/usr/bin/env bash
# One process on the CPU: a short training run to check that everything works.
# Extra arguments go to unetseg.train (e.g. --data shards/camvid --max-steps 50).
#   bash launch/cpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file launch/cpu.yaml -m unetseg.train \
    --max-steps 20 --eval-every 20 --tracker none "$@"
