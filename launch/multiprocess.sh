#!/usr/bin/env bash
# N JAX processes on this machine joined by jax.distributed (CPU collectives over gloo): the
# multi-host code path without a cluster. Each process gets DEVICES fake CPU devices.
#   launch/multiprocess.sh N DEVICES EXPERIMENT.py[:variant] [overrides...]
# COMMAND=finetune runs `llama3 finetune` instead of `llama3 train` (e.g. with --init_from BASE).
# Exits non-zero if any process fails; logs go to $LOG_DIR/process_<i>.log (default: a temp dir).
set -uo pipefail
n=${1:?usage: launch/multiprocess.sh N DEVICES EXPERIMENT.py[:variant] [overrides...]}
devices=${2:?devices per process}
config=${3:?experiment}
shift 3
port=${PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    llama3 "${COMMAND:-train}" --config "$config" "$@" \
    --config.coordinator_address="127.0.0.1:$port" --config.num_processes="$n" \
    --config.process_id="$i" --config.progress=false >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log: $log_dir/process_$i.log" >&2
    tail -20 "$log_dir/process_$i.log" >&2
    status=1
  fi
done
[ "$status" = 0 ] && tail -1 "$log_dir/process_0.log"
exit "$status"
