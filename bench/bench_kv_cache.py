"""One decode step's cache write + attention, KV cache [B, S, K, H] (before) vs [B, K, S, H] (now).

For each layout and dtype: the number of cache-sized arrays the compiled step materialises
besides the in-place update (transposed copies, dtype conversions; read from the optimized HLO,
so independent of machine load) and the median step time. The [B, K, S, H] step is the model's
own (model.attention.xla_attention with kv_layout="BKSH"); the [B, S, K, H] one is the previous
code, kept here as the reference.

    python bench/bench_kv_cache.py [--batch 8] [--cache 1024] [--kv_heads 8] [--repeats 20]
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp

from llama_jax.model.attention import attention_mask, xla_attention


def step_bskh(ck, cv, q, k, v, pos):
    rows = jnp.arange(q.shape[0])[:, None]
    ck, cv = ck.at[rows, pos].set(k), cv.at[rows, pos].set(v)
    return ck, cv, xla_attention(q, ck, cv, attention_mask(pos, ck.shape[1], None, None))


def step_bksh(ck, cv, q, k, v, pos):
    rows = jnp.arange(q.shape[0])[:, None]
    ck, cv = ck.at[rows, :, pos].set(k), cv.at[rows, :, pos].set(v)
    mask = attention_mask(pos, ck.shape[2], None, None)
    return ck, cv, xla_attention(q, ck, cv, mask, kv_layout="BKSH")


def materialised(hlo: str, dims: set[str]) -> list[str]:
    """Cache-sized instructions of the ENTRY computation (each owns a buffer), other than the
    parameters and the in-place update itself (a scatter or dynamic-update-slice fusion)."""
    entry = hlo[hlo.index("\nENTRY") :]
    out = []
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        m = re.match(r"\s*(ROOT )?%(\S+) = \w+\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", line)
        if not m or m.group(3) not in dims:
            continue
        name, op = m.group(2), m.group(4)
        if op == "parameter" or re.search("scatter|dynamic-update-slice", name + op):
            continue
        out.append(name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", type=int, default=1024)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    b, s, k, g, h = a.batch, a.cache, a.kv_heads, a.groups, a.head_dim
    print(f"B={b} S={s} K={k} N={k * g} H={h}; one layer's decode step, cache donated")
    print(
        f"{'dtype':<9} {'layout':<14} {'cache-sized temporaries':>24} {'ms/step':>9} {'ratio':>22}"
    )
    for dt in (jnp.float32, jnp.bfloat16):
        base = None
        for name, f, shape in (
            ("[B, S, K, H]", step_bskh, (b, s, k, h)),
            ("[B, K, S, H]", step_bksh, (b, k, s, h)),
        ):
            j = jax.jit(f, donate_argnums=(0, 1))
            ck, cv = jnp.zeros(shape, dt), jnp.zeros(shape, dt)
            q, kv = jnp.ones((b, 1, k * g, h), dt), jnp.ones((b, 1, k, h), dt)
            pos = jnp.full((b, 1), 5, jnp.int32)
            hlo = j.lower(ck, cv, q, kv, kv, pos).compile().as_text()
            big = materialised(hlo, {f"{b},{s},{k},{h}", f"{b},{k},{s},{h}"})
            ck, cv, o = j(ck, cv, q, kv, kv, pos)
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                ck, cv, o = j(ck, cv, q, kv, kv, pos)
                jax.block_until_ready(o)
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3
            base = base or ms
            ratio = f"{base / ms:.2f}x of [B, S, K, H]"
            print(f"{jnp.dtype(dt).name:<9} {name:<14} {len(big):>24} {ms:>9.2f} {ratio:>22}")
            print(f"          {', '.join(big) or '-'}")


if __name__ == "__main__":
    main()
