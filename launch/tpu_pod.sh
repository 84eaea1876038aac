#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM pod slice; jax.distributed.initialize() auto-detects
# the pod. The run directory must be shared storage (e.g. a gs:// bucket or NFS).
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/llama3_1_8b.py --model_path gs://bucket/run
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE EXPERIMENT.py[:variant] [overrides...]}
zone=${2:?zone}
shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd \$HOME/llama_jax && . .venv/bin/activate && llama3 train$args"
