"""One prepared accelerator check: attention kernel vs XLA, 1B training MFU, 1B decode bandwidth.

On a GPU (one chip) it
  1. checks cuDNN flash attention (jax.nn.dot_product_attention, implementation="cudnn", the
     model's `attention_impl="cudnn"`) against the model's plain-XLA attention: outputs and the
     gradients of q, k, v, bf16, causal, packed segments;
  2. trains the Llama 3.2 1B preset (bf16 compute, f32 master weights, AdamW, chunked loss,
     cuDNN attention) for --steps steps and reports tokens/s and MFU against a measured bf16
     matmul rate and against the chip's nominal peak;
     FLOPs/token = 6 x matmul params + 12 x L x T x N x H (ModelConfig.flops_per_token;
     causal attention not halved);
  3. decodes at batch 1 (bf16, and int8 weights) and reports bytes read per step (weights +
     KV cache) / step time against a measured copy bandwidth (read + write of 2 GiB).
On CPU (no accelerator, or --tiny) the same code runs start to finish at tiny sizes: the
attention check then compares jax.nn.dot_product_attention(implementation="xla") instead.

    python bench/accelerator_check.py            # full sizes on the default backend
    python bench/accelerator_check.py --tiny     # minutes on a CPU; what the test runs

Prints one table; exit status 1 if a correctness check fails. Never asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import numpy as np

NOMINAL = {  # dense bf16 FLOP/s, HBM bytes/s (vendor sheets), by device_kind substring
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _timed(f, n: int) -> float:
    """Median seconds of n calls of f (which blocks)."""
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def attention_check(tiny: bool, gpu: bool) -> tuple[str, float, float, bool]:
    """(what, max |out diff|, max |grad diff| (relative to max |grad|), pass)."""
    import jax
    import jax.numpy as jnp

    from llama_jax.model.transformer import attention_mask, cudnn_attention, xla_attention

    b, t, n, k, h = (2, 64, 4, 2, 32) if tiny else (4, 2048, 32, 8, 64)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(ks[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, k, h), jnp.bfloat16)
    seg = jnp.concatenate(
        [jnp.ones((b, t // 2), jnp.int32), jnp.full((b, t - t // 2), 2, jnp.int32)], 1
    )
    ct = jax.random.normal(ks[3], (b, t, n, h), jnp.float32)

    def ref(q, kk, v):
        slots = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        return xla_attention(q, kk, v, attention_mask(slots, t, seg, seg))

    if gpu:
        name, fast = "cuDNN", lambda q, kk, v: cudnn_attention(q, kk, v, seg)
    else:

        def fast(q, kk, v):
            mask = (seg[:, :, None] == seg[:, None, :])[:, None]
            return jax.nn.dot_product_attention(
                q, kk, v, mask=mask, is_causal=True, implementation="xla"
            )

        name = "jax.nn xla"

    def loss(f):
        return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct)

    out_r, out_f = jax.jit(ref)(q, kk, v), jax.jit(fast)(q, kk, v)
    g_r = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, kk, v)
    g_f = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, kk, v)
    d_out = float(jnp.max(jnp.abs(out_r.astype(jnp.float32) - out_f.astype(jnp.float32))))
    d_grad = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))
        / float(jnp.max(jnp.abs(a.astype(jnp.float32))))
        for a, c in zip(g_r, g_f)
    )
    # bf16 inputs: outputs are O(1); 2^-7 relative steps, summed over S keys.
    return f"attention {name} vs XLA", d_out, d_grad, d_out < 0.05 and d_grad < 0.05


def matmul_rate(tiny: bool) -> float:
    import jax
    import jax.numpy as jnp

    n = 1024 if tiny else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / _timed(lambda: f(a).block_until_ready(), 5)


def copy_bandwidth(tiny: bool) -> float:
    """Bytes moved per second (read + write) by an elementwise op over 2 GiB (32 MiB tiny)."""
    import jax
    import jax.numpy as jnp

    n = (32 if tiny else 2048) * 2**20 // 4
    a = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    return 2 * 4 * n / _timed(lambda: f(a).block_until_ready(), 5)


def train_mfu(tiny: bool, steps: int, gpu: bool, remat: str) -> tuple[float, float, str]:
    """(tokens/s, FLOP/s, description) of the trainer's own step on the 1B preset."""
    import flax.linen as nn
    import jax

    from llama_jax.model import sharding
    from llama_jax.model.config import get_config
    from llama_jax.training import experiment
    from llama_jax.training import trainer as T

    if tiny:
        mc, batch, seq = get_config("tiny", dtype="bfloat16"), 2, 64
    else:
        impl = "cudnn" if gpu else "xla"
        mc = get_config("llama3.2-1b", dtype="bfloat16", attention_impl=impl, remat_policy=remat)
        batch, seq = 8, 2048
    mc = dataclasses.replace(mc, max_seq_len=max(mc.max_seq_len, seq))
    c = experiment.base_config()
    c.batch_size, c.seq_len = batch, seq
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, sched = T.make_tx(c, 1000)
    boxed = jax.eval_shape(functools.partial(T.init_state, mc, tx, 0))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    bsh = sharding.batch_sharding(mesh)
    step = jax.jit(
        T.make_train_step(mc, tx, sched, c),
        in_shardings=(shardings, bsh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    rng = np.random.RandomState(0)
    toks = rng.randint(0, mc.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = jax.device_put(
        {
            "inputs": toks[:, :-1],
            "targets": toks[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "loss_mask": np.ones((batch, seq), np.float32),
        },
        bsh,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state = jax.jit(lambda: nn.unbox(T.init_state(mc, tx, 0)), out_shardings=shardings)()
        state, m = step(state, b)  # compile
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, b)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
    tps = batch * seq / dt
    desc = f"{_size(mc.param_count())} bf16 {batch}x{seq} remat={mc.remat_policy}"
    return tps, tps * mc.flops_per_token(seq), desc


def decode_bandwidth(tiny: bool, quantize: str | None, tokens: int) -> tuple[float, float, str]:
    """(tokens/s, bytes read per second, description) of batch-1 greedy decoding."""
    import flax.linen as nn
    import jax

    from llama_jax.inference import sampler as sampling
    from llama_jax.model import sharding
    from llama_jax.model.config import get_config
    from llama_jax.model.transformer import init_params

    mc = get_config("tiny" if tiny else "llama3.2-1b", dtype="bfloat16")
    prompt_len, cache_len = (8, 64) if tiny else (128, 1024)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = jax.jit(lambda k: nn.unbox(init_params(mc, k)))(jax.random.key(0))
    sampler = sampling.Sampler(mc, params, mesh, quantize=quantize)
    del params
    prompt = [list(range(1, prompt_len + 1))]
    logits, cache = sampler.prefill(np.array(prompt, np.int32), np.array([prompt_len]), cache_len)
    tok = np.array([int(np.argmax(logits[0]))], np.int32)
    pos = prompt_len
    logits, cache = sampler.decode_step(cache, tok, np.array([pos], np.int32))  # compile
    jax.block_until_ready(logits)
    t = time.perf_counter()
    for i in range(tokens):
        logits, cache = sampler.decode_step(cache, tok, np.array([pos + 1 + i], np.int32))
    jax.block_until_ready(logits)
    dt = (time.perf_counter() - t) / tokens
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(sampler.params))
    embed = mc.vocab_size * mc.dim * 2
    weight_bytes -= 0 if mc.tie_embeddings else embed  # the lookup reads one row, not the table
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(cache)) * (pos + tokens // 2) / cache_len
    desc = f"{_size(mc.param_count())} batch 1 {quantize or 'bf16'}, {sampler.layout}"
    return 1 / dt, (weight_bytes + cache_bytes) / dt, desc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the default off a GPU/TPU)")
    p.add_argument("--steps", type=int, default=30, help="training steps timed")
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument(
        "--remat", default="dots_with_no_batch_dims", help="remat policy of the 1B training run"
    )
    args = p.parse_args()
    import jax

    from llama_jax.model.config import REMAT_POLICIES

    if args.remat not in REMAT_POLICIES:
        print(f"error: --remat {args.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
        return 2
    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    tiny = args.tiny or dev.platform == "cpu"
    steps = 3 if tiny and args.steps == 30 else args.steps
    kind = getattr(dev, "device_kind", dev.platform)
    flops_nom, bw_nom = next((v for k, v in NOMINAL.items() if k in kind), (None, None))
    print(
        f"device: {kind} ({dev.platform}), jax {jax.__version__}, "
        f"sizes: {'tiny' if tiny else 'full'}"
    )

    rows: list[tuple[str, str, str, str]] = []
    ok = True
    what, d_out, d_grad, passed = attention_check(tiny, gpu)
    ok &= passed
    rows.append(
        (
            what,
            f"max|dout| {d_out:.2e}",
            f"max|dgrad|/max|grad| {d_grad:.2e}",
            "PASS" if passed else "FAIL",
        )
    )
    peak = matmul_rate(tiny)
    rows.append(
        (
            "bf16 matmul (measured peak)",
            f"{peak / 1e12:.3f} TFLOP/s",
            f"nominal {flops_nom / 1e12:.0f}" if flops_nom else "nominal -",
            f"{peak / flops_nom:.0%}" if flops_nom else "-",
        )
    )
    tps, fl, desc = train_mfu(tiny, steps, gpu, args.remat)
    mfu_nom = f", {fl / flops_nom:.1%} of nominal" if flops_nom else ""
    rows.append(
        (
            f"train {desc}, {steps} steps",
            f"{tps:,.0f} tok/s",
            f"{fl / 1e12:.3f} TFLOP/s",
            f"MFU {fl / peak:.1%} of measured{mfu_nom}",
        )
    )
    bw = copy_bandwidth(tiny)
    rows.append(
        (
            "copy bandwidth (read+write)",
            f"{bw / 1e9:.1f} GB/s",
            f"nominal {bw_nom / 1e9:.0f}" if bw_nom else "nominal -",
            f"{bw / bw_nom:.0%}" if bw_nom else "-",
        )
    )
    base = None
    for quant in (None, "int8"):
        tok_s, rate, desc = decode_bandwidth(tiny, quant, args.decode_tokens)
        base = base or tok_s
        rows.append(
            (
                f"decode {desc}",
                f"{tok_s:,.1f} tok/s",
                f"{rate / 1e9:.1f} GB/s read",
                f"{rate / bw:.0%} of copy bw; {tok_s / base:.2f}x bf16",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    print("correctness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
