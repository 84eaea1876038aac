"""Test setup: fake 8 CPU devices before JAX is imported anywhere."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole run, made by the first pytest process and inherited
# by the pytest-xdist workers and the subprocesses tests start (CLI runs, kill -9 / resume,
# multi-process): many tests compile the same tiny train step in a fresh process.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# llama_jax before jax: an installed CUDA plugin (the gpu-plan extra) stays out of the CPU tests
# as it does out of CPU runs (llama_jax/cuda_plugin.py).
import llama_jax  # noqa: E402, F401, I001
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The files that take longest (measured: `pytest --durations`, 2026-12-04), run first: xdist
# hands whole files to its workers in collection order, so a long file collected last would run
# alone at the end while the other worker sits idle.
LONGEST_FIRST = (
    "test_train.py",
    "test_finetune.py",
    "test_faults.py",
    "test_serve.py",
    "test_hardening.py",
    "test_sampling.py",
    "test_gguf_write.py",
    "test_smollm2.py",
    "test_reference.py",
    "test_lora.py",
    "test_accelerator_check.py",
    "test_smollm2_train_eval.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
