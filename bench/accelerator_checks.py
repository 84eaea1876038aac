"""The correctness rows of accelerator_check.py: cuDNN / splash attention against XLA, and the
TPU compile of splash attention (libtpu's compile-only devices)."""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import time


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


def splash_tpu_compile(tiny: bool, topology: str) -> tuple[str, str, str, str]:
    """Compiles splash attention's forward + backward (bf16, GQA, packed segments) inside
    shard_map for compile-only TPU devices (libtpu's topology API; no TPU needed): a table row.

    The mesh splits batch over fsdp and heads over a tensor axis of 2, as the model's rules do.
    """
    import importlib.util

    what = f"splash attention, TPU {topology} compile-only"
    if importlib.util.find_spec("libtpu") is None:
        return what, "skipped: no libtpu", "pip install llama_jax[tpu]", "-"
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax.model import attention, sharding
    from llama_jax.training import plan

    _, topo, chips = plan.parse_topology(topology)
    mesh = sharding.make_mesh((1, -1, 2), plan.topology_devices(topo))
    # The 1B preset's attention shapes (or tiny ones): [B, T, N|K, H], 2 rows per chip.
    b, t, n, k, h = (4, 128, 4, 2, 64) if tiny else (2 * chips, 2048, 32, 8, 64)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        spec = lambda *axes: nn.logical_to_mesh_sharding(
            jax.sharding.PartitionSpec(*axes), mesh, sharding.LOGICAL_RULES
        )
        q = jax.ShapeDtypeStruct(
            (b, t, n, h), jnp.bfloat16, sharding=spec("batch", None, "act_heads")
        )
        kv = jax.ShapeDtypeStruct(
            (b, t, k, h), jnp.bfloat16, sharding=spec("batch", None, "act_kv_heads")
        )
        seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec("batch", None))

        def loss(q, k, v, seg):
            return jnp.sum(attention.splash_attention(q, k, v, seg).astype(jnp.float32))

        t0 = time.perf_counter()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
        secs = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    return (
        f"{what} (B{b} T{t} N{n} K{k} H{h}, fwd+bwd)",
        f"compiled in {secs:.1f} s",
        f"temp {temp / 2**20:.1f} MiB/chip",
        "PASS",
    )
