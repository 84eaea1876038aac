#!/usr/bin/env bash
# Train on this machine's devices (CPU, or every local GPU/TPU).
#   launch/local.sh experiments/shakespeare_tiny.py [--config.key=value ...]
set -euo pipefail
config=${1:?usage: launch/local.sh EXPERIMENT.py[:variant] [overrides...]}
shift
exec llama3 train --config "$config" "$@"
