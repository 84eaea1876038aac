"""Attention kernels (attention.py): splash (Pallas interpreter on CPU) against plain XLA, inside
shard_map over a (data, fsdp, tensor) mesh, with grouped-query heads and packed segments; the
cuDNN path's up-front checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import attention, sharding
from llama_jax.model.config import get_config
from llama_jax.model.transformer import Transformer, init_params

B, T, N, K, H = 4, 128, 4, 2, 16  # GQA: two query heads per kv head; T = one splash tile


def _qkv(dtype=jnp.float32, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, T, N, H), dtype)
    k = jnp.asarray(r.randn(B, T, K, H), dtype)
    v = jnp.asarray(r.randn(B, T, K, H), dtype)
    # Packed rows: segment boundaries that do not fall on a tile edge, a different one per row.
    seg = np.ones((B, T), np.int32)
    for b, cut in enumerate((50, 77, 1, 127)):
        seg[b, cut:] = 2
    seg[1, 100:] = 3
    return q, k, v, jnp.asarray(seg)


def _loss_and_grads(impl, q, k, v, seg):
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))

    def f(q, k, v):
        out = attention.attend(q, k, v, positions, seg, impl)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)


@pytest.mark.parametrize(
    "mesh_shape, dtype", [(None, "float32"), ((1, 2, 2), "float32"), ((2, 1, 2), "bfloat16")]
)
def test_splash_matches_xla_values_and_gradients(mesh_shape, dtype):
    """Outputs and dq, dk, dv of the splash kernel (GQA, segments, in shard_map when a mesh is
    set: batch over data/fsdp, heads over tensor) equal the XLA path's."""
    q, k, v, seg = _qkv(jnp.dtype(dtype))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        if mesh_shape is None:
            (_, ref), ref_g = _loss_and_grads("xla", q, k, v, seg)
            (_, out), g = _loss_and_grads("splash", q, k, v, seg)
        else:
            with jax.set_mesh(sharding.make_mesh(mesh_shape, jax.devices()[:4])):
                (_, ref), ref_g = _loss_and_grads("xla", q, k, v, seg)
                (_, out), g = _loss_and_grads("splash", q, k, v, seg)
    assert out.dtype == q.dtype
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    f32 = lambda a: np.asarray(a, np.float32)
    np.testing.assert_allclose(f32(out), f32(ref), **tol)
    for name, a, b in zip("qkv", g, ref_g):
        np.testing.assert_allclose(
            f32(a), f32(b), **(tol | {"atol": 5 * tol["atol"]}), err_msg=name
        )


def test_splash_segments_matter():
    """The segment ids reach the kernel: one segment per row gives a different output."""
    q, k, v, seg = _qkv()
    run = jax.jit(lambda s: attention.splash_attention(q, k, v, s))
    assert float(jnp.max(jnp.abs(run(seg) - run(jnp.ones_like(seg))))) > 1e-2


def test_splash_bfloat16_traces_through_the_layer_scan():
    """bf16 splash keeps the residual stream's dtype through the scanned, rematerialised layers
    (the old code's scan carry mismatch: bf16 in, f32 out); traced abstractly."""
    cfg = get_config("tiny", dtype="bfloat16", attention_impl="splash", remat_policy="full")
    params = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))
    tokens = jax.ShapeDtypeStruct((2, T), jnp.int32)

    def loss(p, tokens):
        logits, _ = Transformer(cfg).apply({"params": p}, tokens, segment_ids=tokens)
        return jnp.mean(logits)

    grads = jax.eval_shape(jax.grad(loss), params, tokens)
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)


def test_splash_rejects_lengths_off_the_tile():
    q, k, v, seg = _qkv()
    with pytest.raises(ValueError, match=r"multiple of 128.*seq_len = 128"):
        attention.splash_attention(q[:, :100], k[:, :100], v[:, :100], seg[:, :100])
    assert attention.splash_block(8192) == 512 and attention.splash_block(384) == 128


@pytest.mark.parametrize(
    "dtype, h, t, match",
    [
        (jnp.float32, 64, 128, "bfloat16 or float16 activations, got q float32"),
        (jnp.bfloat16, 12, 128, "multiple of 8 and <= 256.*got 12"),
        (jnp.bfloat16, 512, 128, "multiple of 8 and <= 256.*got 512"),
        (jnp.bfloat16, 64, 127, "even length, got 127"),
    ],
)
def test_cudnn_constraints_checked_up_front(dtype, h, t, match):
    """Inputs cuDNN flash attention cannot take fail with one clear line on any host, before
    jax.nn.dot_product_attention looks for a GPU."""
    q = jnp.zeros((1, t, 4, h), dtype)
    kv = jnp.zeros((1, t, 2, h), dtype)
    seg = jnp.ones((1, t), jnp.int32)
    with pytest.raises(ValueError, match=match):
        attention.cudnn_attention(q, kv, kv, seg)
    ok = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    ok_kv = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    assert attention.check_cudnn(ok, ok_kv, ok_kv, seg[:, :128]) is None  # valid: no error
