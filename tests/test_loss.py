"""Chunked cross-entropy (loss.py) against torch's cross-entropy and the trainer's plain loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import Transformer, init_params
from llama_jax.training import loss as loss_lib
from llama_jax.training import step as training_step
from llama_jax.training import trainer

B, T, D, V = 3, 12, 16, 61


def _torch_reference(hidden, w, layout, targets, mask, z_loss):
    """Loss sums and gradients from torch: F.cross_entropy and torch.logsumexp, autograd."""
    h = torch.tensor(np.asarray(hidden), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(np.asarray(w), dtype=torch.float64, requires_grad=True)
    logits = h @ wt if layout == "DV" else h @ wt.T
    tg = torch.tensor(np.asarray(targets), dtype=torch.long)
    m = torch.tensor(np.asarray(mask), dtype=torch.float64)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tg.reshape(-1), reduction="none")
    nll = (nll * m.reshape(-1)).sum()
    zl = z_loss * (torch.logsumexp(logits, -1).square() * m).sum()
    (nll + 2.0 * zl).backward()
    nll, zl = nll.detach(), zl.detach()
    return nll.item(), zl.item(), h.grad.numpy(), wt.grad.numpy()


@pytest.mark.parametrize(
    "layout, z_loss, chunk_tokens", [("DV", 0.0, 3), ("VD", 1e-2, 12), ("DV", 1e-2, 1024)]
)
def test_chunked_loss_matches_torch(layout, z_loss, chunk_tokens):
    ks = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(ks[0], (B, T, D))
    w = jax.random.normal(ks[1], (D, V) if layout == "DV" else (V, D)) * 0.5
    targets = jax.random.randint(ks[2], (B, T), 0, V)
    mask = (jax.random.uniform(ks[3], (B, T)) > 0.3).astype(jnp.float32)

    def f(h, w):
        nll, zl = loss_lib.chunked_cross_entropy(h, w, layout, targets, mask, z_loss, chunk_tokens)
        return nll + 2.0 * zl, (nll, zl)

    (_, (nll, zl)), (dh, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, w)
    ref_nll, ref_zl, ref_dh, ref_dw = _torch_reference(hidden, w, layout, targets, mask, z_loss)
    np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
    np.testing.assert_allclose(float(zl), ref_zl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-5)
    # Without differentiation only the sums are computed; they agree too.
    nll2, _ = jax.jit(lambda h: loss_lib.chunked_cross_entropy(h, w, layout, targets, mask))(hidden)
    np.testing.assert_allclose(float(nll2), ref_nll, rtol=1e-5)


def test_chunk_length_divides_the_sequence():
    assert loss_lib.chunk_length(8, 256, 1024) == 128
    assert loss_lib.chunk_length(8, 12, 30) == 3
    assert loss_lib.chunk_length(64, 7, 16) == 1
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        loss_lib.chunk_length(8, 256, 0)


def _tiny(tie: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=96,
        max_seq_len=64,
        tie_embeddings=tie,
    )


@pytest.mark.parametrize("tie", [False, True])
def test_trainer_loss_terms_chunked_equal_plain(tie):
    """The trainer's loss and its gradients for every param, chunked vs full logits, on a mesh
    that shards the batch over fsdp and the vocabulary over tensor."""
    cfg = _tiny(tie)
    model = Transformer(cfg)
    params = nn.unbox(init_params(cfg, jax.random.key(1)))
    rng = np.random.RandomState(0)
    b, t = 4, 16
    batch = {
        "inputs": rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
        "targets": rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "segment_ids": np.repeat([[1] * 10 + [2] * 6], b, 0).astype(np.int32),
        "loss_mask": (rng.rand(b, t) > 0.2).astype(np.float32),
    }
    mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])

    def grads(chunk):
        def f(p):
            nll, zl, n = training_step.loss_terms(p, batch, model, 1e-3, chunk)
            return nll + zl, (nll, zl, n)

        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    with pytest.raises(ValueError, match=r"loss_chunk_tokens=-8; valid: 0 \(full logits\)"):
        training_step.loss_terms(params, batch, model, 0.0, -8)
    (_, plain_terms), plain_g = grads(0)
    (_, chunk_terms), chunk_g = grads(8)  # 8 tokens = 2 positions x 4 rows per chunk
    for a, b_ in zip(plain_terms, chunk_terms):
        np.testing.assert_allclose(float(a), float(b_), rtol=1e-5)
    flat_p = jax.tree_util.tree_leaves_with_path(plain_g)
    flat_c = jax.tree.leaves(chunk_g)
    for (path, a), b_ in zip(flat_p, flat_c):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_chunked_loss_in_bfloat16_is_close_to_float32():
    """bf16 compute (f32 master weights): the chunked loss tracks the f32 plain loss."""
    cfg = dataclasses.replace(_tiny(False), dtype="bfloat16")
    params = nn.unbox(init_params(cfg, jax.random.key(2)))
    rng = np.random.RandomState(1)
    b, t = 2, 16
    batch = {
        "inputs": rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
        "targets": rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "segment_ids": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), np.float32),
    }
    f32 = training_step.loss_terms(params, batch, Transformer(_tiny(False)), 0.0, 0)
    bf16 = training_step.loss_terms(params, batch, Transformer(cfg), 0.0, 8)
    np.testing.assert_allclose(float(bf16[0]), float(f32[0]), rtol=1e-2)
    g = jax.grad(lambda p: training_step.loss_terms(p, batch, Transformer(cfg), 0.0, 8)[0])(params)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))


def test_eval_step_chunks_the_loss_like_training():
    """Validation at a large vocabulary must not build the [B, T, V] float32 logits: the
    compiled eval step's temporaries with the run's loss_chunk_tokens stay far below the logits'
    size, which the unchunked step does allocate (the compiler's own numbers)."""
    cfg = ModelConfig(
        vocab_size=32768, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=256
    )
    b, t = 2, 256
    logits_bytes = b * t * cfg.vocab_size * 4  # 64 MiB
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    params = nn.unbox(params)
    batch = {
        k: jax.ShapeDtypeStruct((b, t), jnp.int32)
        for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    }

    def temp_bytes(chunk: int) -> int:
        step = training_step.make_eval_step(cfg, None, chunk)
        with nn.logical_axis_rules(sharding.LOGICAL_RULES):
            compiled = jax.jit(step).lower(params, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(32)  # 32 tokens: a 4 MiB chunk of logits
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4
