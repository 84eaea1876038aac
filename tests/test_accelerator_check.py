"""bench/accelerator_check.py runs start to finish on CPU (tiny sizes), as it must on a GPU."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_check_runs_on_cpu_at_tiny_sizes():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # one CPU device, like a single-chip machine
    res = subprocess.run(
        [sys.executable, "bench/accelerator_check.py", "--tiny", "--minutes", "60",
         "--tpu_topology", ""],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    out = res.stdout
    assert "correctness: PASS" in out
    table = out.split("\n\n")[-1]  # the final table, after the progress lines
    for row in (
        "attention jax.nn xla vs XLA",
        "decode_chunk: generate_ids tokens",
        "bf16 matmul",
        "copy bandwidth",
        "decode 0.1M bf16 matvec k=1 batch 1",
        "decode 0.1M int8 matvec k=1 batch 1",
        "decode tiny 2-layer batch 1 k=8",
        "train 1B-shape",
        "train best: 1B-shape",
        "train 8B-shape 1 layers",
        "transformers eager batch 1",
    ):
        assert row in table, (row, out)
    # int8 read in place: no weight-sized float buffer in the compiled decode step.
    assert re.search(r"int8 matvec k=1: dequantised weight copies +0 ", table), out
    assert " error " not in table and "skipped" not in table, out
    bad = subprocess.run(
        [sys.executable, "bench/accelerator_check.py", "--train_sweep", "8x2048:sometimes:0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr[-2000:]
    assert "error: remat 'sometimes' in '8x2048:sometimes:0'; valid: none, full" in bad.stdout
