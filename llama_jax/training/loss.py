"""Next-token cross-entropy over the vocabulary without materialising [B*T, V] logits.

The plain loss projects every token to float32 logits [B, T, V] (8 x 2048 x 128256 x 4 bytes =
8.4 GB for Llama 3.2-1B at batch 8 x 2048), keeps them for the backward pass and writes a
gradient of the same size. `chunked_cross_entropy` walks the sequence in chunks of tokens
instead: for each chunk it computes the logits, the log-sum-exp, the target logit and, in the
same pass, the gradient of the loss with respect to the chunk's logits, which it immediately
contracts into the gradients of the hidden states and of the head weight (the idea of Liger
Kernel's fused linear cross-entropy). Only [chunk, V] logits ever exist, and the head's matmuls
are the same three as the plain loss's (forward, d hidden, d weight): nothing is recomputed.

The function is a `jax.custom_vjp`: its forward pass (under differentiation) returns the loss
sums and keeps the gradients as residuals; the backward pass only scales them by the incoming
cotangents. Without differentiation (evaluation) only the sums are computed.

  output_head             the head weight of a param tree and its layout ("DV" or tied "VD").
  chunked_cross_entropy   summed masked NLL and z-loss from hidden states and the head weight.
  plain_cross_entropy     the same from logits (the reference; what train.py did before).
  chunk_length            the chunk length along T for a batch, a vocabulary and a token budget.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.config import ModelConfig

Array = jax.Array

DEFAULT_CHUNK_TOKENS = 1024  # tokens per chunk: [1024, V] float32 logits at a time


def output_head(params: Any, config: ModelConfig) -> tuple[Array, str]:
    """The output projection's weight and its layout: lm_head [D, V] ("DV") or, with tied
    embeddings, the embedding [V, D] ("VD"). Cast to the model's compute dtype like model.py."""
    params = nn.unbox(params)
    if config.tie_embeddings:
        w, layout = params["embedding"], "VD"
    else:
        w, layout = params["lm_head"], "DV"
    return w.astype(jnp.dtype(config.dtype)), layout


def chunk_length(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """Longest divisor c of seq_len with batch * c <= chunk_tokens (at least 1)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}; valid: a positive number of tokens")
    best = 1
    for c in range(1, seq_len + 1):
        if seq_len % c == 0 and batch * c <= chunk_tokens:
            best = c
    return best


def plain_cross_entropy(
    logits: Array, targets: Array, mask: Array, z_loss: float
) -> tuple[Array, Array]:
    """(sum of masked NLL, z_loss * sum of masked logsumexp^2) from float32 logits [B, T, V]."""
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.sum((logz - target_logit) * mask)
    zl = z_loss * jnp.sum(jnp.square(logz) * mask)
    return nll, zl


def _logits(x: Array, w: Array, layout: str) -> Array:
    """x [n, D] @ head -> float32 [n, V]."""
    dims = (((1,), (0,)), ((), ())) if layout == "DV" else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _chunk_terms(x, w, targets, mask, layout, z_loss, with_grads):
    """One chunk: x [n, D], targets/mask [n] -> (nll, zl[, dx_nll, dw_nll, dx_z, dw_z])."""
    logits = _logits(x, w, layout)  # [n, V] float32
    logz = jax.nn.logsumexp(logits, axis=-1)  # [n]
    hit = jnp.arange(logits.shape[-1])[None, :] == targets[:, None]  # [n, V]
    target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    mask = mask.astype(jnp.float32)
    nll = jnp.sum((logz - target_logit) * mask)
    zl = z_loss * jnp.sum(jnp.square(logz) * mask)
    if not with_grads:
        return nll, zl
    probs = jnp.exp(logits - logz[:, None])  # softmax [n, V]

    def back(dlogits):  # d/dlogits [n, V] -> (d/dx [n, D] f32, d/dw in w's layout, f32)
        dl = dlogits.astype(x.dtype)
        f32 = {"preferred_element_type": jnp.float32}
        if layout == "DV":
            dx = jax.lax.dot_general(dl, w, (((1,), (1,)), ((), ())), **f32)
            dw = jax.lax.dot_general(x, dl, (((0,), (0,)), ((), ())), **f32)
        else:
            dx = jax.lax.dot_general(dl, w, (((1,), (0,)), ((), ())), **f32)
            dw = jax.lax.dot_general(dl, x, (((0,), (0,)), ((), ())), **f32)
        return dx, dw

    dx_nll, dw_nll = back((probs - hit) * mask[:, None])
    if z_loss == 0.0:
        return nll, zl, dx_nll, dw_nll
    dx_z, dw_z = back(probs * (2.0 * z_loss * logz * mask)[:, None])
    return nll, zl, dx_nll, dw_nll, dx_z, dw_z


def _as_chunks(a: Array, c: int) -> Array:
    """[B, T, ...] -> [T // c, B * c, ...]: chunk j holds every row's tokens jc..jc+c-1, so the
    batch axis (sharded over data/fsdp) stays inside each chunk."""
    b, t = a.shape[:2]
    a = a.reshape(b, t // c, c, *a.shape[2:])
    return jnp.moveaxis(a, 1, 0).reshape(t // c, b * c, *a.shape[3:])


def _from_chunks(a: Array, b: int) -> Array:
    """Inverse of `_as_chunks`: [T // c, B * c, ...] -> [B, T, ...]."""
    n, bc = a.shape[:2]
    c = bc // b
    a = jnp.moveaxis(a.reshape(n, b, c, *a.shape[2:]), 0, 1)
    return a.reshape(b, n * c, *a.shape[3:])


def _scan(hidden, w, targets, mask, layout, z_loss, c, with_grads):
    b = hidden.shape[0]
    xs = (_as_chunks(hidden, c), _as_chunks(targets, c), _as_chunks(mask, c))
    n_grads = 0 if not with_grads else (2 if z_loss == 0.0 else 4)
    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero) + (jnp.zeros(w.shape, jnp.float32),) * (n_grads // 2)

    def body(carry, chunk):
        out = _chunk_terms(*chunk[:1], w, *chunk[1:], layout, z_loss, with_grads)
        sums = (carry[0] + out[0], carry[1] + out[1])
        dws = tuple(acc + dw for acc, dw in zip(carry[2:], out[3::2]))
        return sums + dws, out[2::2]

    carry, dxs = jax.lax.scan(body, init, xs)
    dxs = tuple(_from_chunks(d, b) for d in dxs)
    return carry[0], carry[1], dxs, carry[2:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(hidden, w, targets, mask, layout, z_loss, c):
    nll, zl, _, _ = _scan(hidden, w, targets, mask, layout, z_loss, c, with_grads=False)
    return nll, zl


def _chunked_fwd(hidden, w, targets, mask, layout, z_loss, c):
    nll, zl, dxs, dws = _scan(hidden, w, targets, mask, layout, z_loss, c, with_grads=True)
    dxs = tuple(d.astype(hidden.dtype) for d in dxs)
    dws = tuple(d.astype(w.dtype) for d in dws)
    return (nll, zl), (dxs, dws)


def _chunked_bwd(layout, z_loss, c, res, cts):
    dxs, dws = res
    g_nll, g_z = cts
    dx, dw = g_nll * dxs[0], g_nll * dws[0]
    if len(dxs) > 1:
        dx, dw = dx + g_z * dxs[1], dw + g_z * dws[1]
    return dx.astype(dxs[0].dtype), dw.astype(dws[0].dtype), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_cross_entropy(
    hidden: Array,
    w: Array,
    layout: str,
    targets: Array,
    mask: Array,
    z_loss: float = 0.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Array, Array]:
    """Summed masked next-token NLL and z-loss, equal to `plain_cross_entropy` of the logits
    `hidden @ head`, computed in chunks of about `chunk_tokens` tokens.

    Args:
      hidden: [B, T, D], the final-normed hidden states (model(..., return_hidden=True)).
      w: the head weight, [D, V] for layout "DV" or [V, D] for "VD" (see `output_head`).
      layout: "DV" or "VD".
      targets: int [B, T]; mask: [B, T] loss weights (0/1).
      z_loss: coefficient of the z-loss term (a Python float; part of the compiled function).
      chunk_tokens: tokens per chunk (B x chunk length along T); see `chunk_length`.

    Returns:
      (sum of mask * (logsumexp - target logit), z_loss * sum of mask * logsumexp^2), float32.
      Differentiable in hidden and w; the backward pass costs no extra matmuls.
    """
    if layout not in ("DV", "VD"):
        raise ValueError(f"layout={layout!r}; valid: 'DV' (lm_head) or 'VD' (tied embedding)")
    b, t = targets.shape
    c = chunk_length(b, t, chunk_tokens)
    return _chunked(hidden, w, targets, mask, layout, float(z_loss), c)
