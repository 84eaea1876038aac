"""bench/accelerator_check.py runs start to finish on CPU (tiny sizes), as it must on a GPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_check_runs_on_cpu_at_tiny_sizes():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # one CPU device, like a single-chip machine
    res = subprocess.run(
        [sys.executable, "bench/accelerator_check.py", "--tiny", "--steps", "2",
         "--decode_tokens", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    out = res.stdout
    assert "correctness: PASS" in out
    for row in ("attention jax.nn xla vs XLA", "bf16 matmul", "train ", "copy bandwidth",
                "decode ", "batch 1 int8"):  # fmt: skip
        assert row in out, out
    bad = subprocess.run(
        [sys.executable, "bench/accelerator_check.py", "--remat", "sometimes"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "error: --remat 'sometimes'; valid: none, full" in bad.stdout
