"""int8 decode with a tied embedding: the head reading an int8 copy of the table vs the table.

One random-initialised Hugging Face directory of the llama3.2-1b preset (bf16, tied; all 16
layers unless --layers), then `Sampler.decode_step` at batch 1 (16-token prompt, best of 3 x 10
steps) for: bf16 weights, int8 weights with the int8 head copy (the default), and int8 with the
head reading the bf16 table (the copy removed before anything compiles). Prints ms per token,
tok/s, the bytes stored and each ratio to bf16. Never asserts on time.

  python bench/bench_int8_head.py [--layers N]
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from bench_eval import make_model_dir  # noqa: E402  (bench/)

from llama_jax import Llama3
from llama_jax.inference import sampler as sampling


def step_time(s: sampling.Sampler, n: int = 10) -> float:
    logits, cache = s.prefill(np.ones((1, 16), np.int32), np.full((1,), 16), 64)
    t, pos = np.ones((1,), np.int32), np.full((1,), 16, np.int32)
    for i in range(3):
        logits, cache = s.decode_step(cache, t, pos + i)
    logits.block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(n):
            logits, cache = s.decode_step(cache, t, pos + 3 + i)
        logits.block_until_ready()
        times.append((time.perf_counter() - start) / n)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(make_model_dir(Path(tmp), "1b", 256, args.layers, "bfloat16"), flush=True)
        model = Llama3.from_pretrained(tmp, dtype="bfloat16")
        rates = {}
        for name in ("bf16", "int8 (int8 head copy)", "int8 (head reads the bf16 table)"):
            quantize = None if name == "bf16" else "int8"
            s = sampling.Sampler(model.config, model.params, model.mesh, quantize=quantize)
            if "table" in name:
                s.params = {k: v for k, v in s.params.items() if k != sampling.TIED_HEAD}
            stored = sum(x.nbytes for x in jax.tree.leaves(s.params)) / 1e9
            dt = step_time(s)
            rates[name] = dt
            ratio = f"  {rates['bf16'] / dt:.2f}x bf16" if name != "bf16" else ""
            print(f"{name:34s} [{s.layout}] {stored:5.2f} GB stored  {dt * 1e3:7.1f} ms/token  "
                  f"{1 / dt:6.1f} tok/s{ratio}", flush=True)  # fmt: skip
            del s


if __name__ == "__main__":
    main()
