"""Conversion cost and forward throughput.

1. A Llama-3.2-1B-shaped random checkpoint in bfloat16 (2.5 GB, Hugging Face safetensors) is
   converted to a llama_jax model directory and back to Hugging Face, each in a fresh process;
   prints wall time and peak RSS as a ratio to the checkpoint's size (goal: peak < 1.5x).
2. Forward-pass tokens/s of llama_jax (`Llama3.logits`, jitted) against transformers
   `LlamaForCausalLM` on the same weights, float32, for the ~50M model and the 1B shape.

    python bench/bench_convert.py [--workdir /tmp/bench_convert] [--skip_1b_forward]
Prints numbers and ratios; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from shapes import SMALL_50M  # noqa: E402  (bench/)

from llama_jax.formats import params_to_tensors, write_safetensors
from llama_jax.model.config import get_config

SMALL = dict(SMALL_50M, max_seq_len=1024)


def random_params(config, dtype, seed=0):
    """llama_jax params with N(0, 0.02) weights and unit norms, as numpy."""
    rng = np.random.default_rng(seed)
    d, n, k, h, f, v, L = (
        config.dim,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.mlp_dim,
        config.vocab_size,
        config.n_layers,
    )

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)

    params = {
        "embedding": w(v, d),
        "final_norm": {"scale": np.ones(d, dtype)},
        "layers": {
            "attention_norm": {"scale": np.ones((L, d), dtype)},
            "mlp_norm": {"scale": np.ones((L, d), dtype)},
            "attention": {
                "wq": w(L, d, n, h),
                "wk": w(L, d, k, h),
                "wv": w(L, d, k, h),
                "wo": w(L, n, h, d),
            },
            "mlp": {"w_gate": w(L, d, f), "w_up": w(L, d, f), "w_down": w(L, f, d)},
        },
    }
    if not config.tie_embeddings:
        params["lm_head"] = w(d, v)
    return params


def write_hf(config, params, path):
    os.makedirs(path, exist_ok=True)
    hf = config.to_hf()
    hf["torch_dtype"] = str(np.dtype(params["embedding"].dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    write_safetensors(os.path.join(path, "model.safetensors"), params_to_tensors(params, config))


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


_PEAK = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("VMHWM", int(line.split()[1]) * 1024)
"""


def timed_child(code: str) -> tuple[float, float]:
    """(seconds, peak RSS bytes) of `python -c code` in a fresh process.

    The peak is the child's own VmHWM (reset at exec, so the parent's memory never counts).
    """
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code + "\n" + _PEAK], capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    seconds = time.perf_counter() - start
    peak = float(proc.stdout.split("VMHWM")[-1])
    return seconds, peak


def convert_bench(workdir):
    get_config("llama3.2-1b", param_dtype="bfloat16", dtype="bfloat16")
    hf_dir, ours, back = (os.path.join(workdir, x) for x in ("hf", "ours", "back"))
    for p in (ours, back):
        shutil.rmtree(p, ignore_errors=True)
    if not os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        # In a child, so this process stays small.
        here = os.path.dirname(os.path.abspath(__file__))
        timed_child(
            f"import ml_dtypes, sys; sys.path.insert(0, {here!r}); import bench_convert as b; "
            "from llama_jax.model.config import get_config; "
            "c = get_config('llama3.2-1b', param_dtype='bfloat16', dtype='bfloat16'); "
            f"b.write_hf(c, b.random_params(c, ml_dtypes.bfloat16), {hf_dir!r})"
        )
    size = dir_bytes(hf_dir)
    base_s, base_rss = timed_child("import llama_jax.formats, jax; jax.devices()")
    print(
        f"Llama-3.2-1B shape, bfloat16 checkpoint: {size / 1e9:.2f} GB "
        f"(baseline process RSS {base_rss / 1e9:.2f} GB: python + jax imported)"
    )
    rows = []
    for name, src, dst, fmt in (
        ("HF -> llama_jax", hf_dir, ours, "llama_jax"),
        ("llama_jax -> HF", ours, back, "hf"),
    ):
        code = f"from llama_jax.formats import convert; convert({src!r}, {dst!r}, {fmt!r})"
        seconds, peak = timed_child(code)
        rows.append((name, seconds, peak))
        print(
            f"  {name:<16} {seconds:6.1f} s   peak RSS {peak / 1e9:5.2f} GB = "
            f"{peak / size:4.2f}x checkpoint ({(peak - base_rss) / size:4.2f}x above baseline)",
            flush=True,
        )
    return rows


def forward_bench(fields, batch, seq, reps=3):
    import jax.numpy as jnp
    import torch
    import transformers

    from llama_jax import Llama3
    from llama_jax.model.config import ModelConfig

    config = ModelConfig(**fields)
    params = random_params(config, np.float32)
    model = Llama3(config=config, params=params, dtype="float32")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    model.logits(tokens)
    jt = []
    for _ in range(reps):
        t = time.perf_counter()
        model.logits(tokens)
        jt.append(time.perf_counter() - t)
    # transformers on the same weights
    hf = transformers.LlamaConfig(
        **{k: v for k, v in config.to_hf().items() if k not in ("architectures", "torch_dtype")}
    )
    ref = transformers.LlamaForCausalLM(hf).eval()
    state = {
        name: torch.from_numpy(np.ascontiguousarray(a))
        for name, a in params_to_tensors(params, config)
    }
    ref.load_state_dict(state, strict=False)
    del params, state
    x = torch.tensor(tokens)
    tt = []
    with torch.no_grad():
        ref(x)
        for _ in range(reps):
            t = time.perf_counter()
            ref(x)
            tt.append(time.perf_counter() - t)
    n = batch * seq
    j, r = n / statistics.median(jt), n / statistics.median(tt)
    print(
        f"  {config.param_count() / 1e6:7.0f}M params, {batch}x{seq}: llama_jax {j:8.0f} tok/s, "
        f"transformers {r:8.0f} tok/s, ratio {j / r:4.2f}x",
        flush=True,
    )
    del jnp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--skip_1b_forward", action="store_true")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    convert_bench(args.workdir)
    print("\nforward pass, float32, same weights:")
    forward_bench(SMALL, 4, 512)
    if not args.skip_1b_forward:
        fields = {k: v for k, v in get_config("llama3.2-1b").__dict__.items()}
        forward_bench(fields, 1, 256, reps=2)


if __name__ == "__main__":
    main()
