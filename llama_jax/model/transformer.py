"""The Llama 3 transformer in Flax linen, read top to bottom like the paper.

Einsum letters:
  B batch            T query length        S key/value (cache) length
  D model dim        N query heads         K key/value heads      G = N // K
  H head dim         F MLP hidden dim      V vocabulary           L layers

Parameters carry logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`norm`, `layers`) and activations carry logical constraints (`batch`, `length`, `act_*`);
`sharding.py` maps them to mesh axes. Mesh axis names never appear here.

Parameter tree (scanned layers; every `layers` leaf has a leading [L] axis):
  embedding [V, D]
  layers/attention_norm/scale [L, D]
  layers/attention/{wq [L, D, N, H], wk [L, D, K, H], wv [L, D, K, H], wo [L, N, H, D]}
  layers/mlp_norm/scale [L, D]
  layers/mlp/{w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D]}
  final_norm/scale [D]
  lm_head [D, V]                   (absent when embeddings are tied)

RoPE uses the Hugging Face "half-split" layout of q/k features; Meta checkpoints are permuted
on import (convert.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model.attention import (  # noqa: F401  (cudnn_attention, xla_attention re-exported)
    attend,
    attention_mask,
    cudnn_attention,
    xla_attention,
)
from llama_jax.model.config import ModelConfig

Array = jax.Array
Cache = Any  # {"k": [L, B, K, S, H], "v": ...} when scanned; tuple of per-layer dicts otherwise

# [B, K, S, H] per layer: the attention dots contract the cache with (B, K) as batch dims, so
# this layout is read in place; [B, S, K, H] cost a transposed copy of the cache per layer per
# step (bench/RESULTS.md). Rows stay on axis 1 of the stacked [L, B, ...] leaves.
CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_length", "head_dim")


def _dtype(name: str):
    return jnp.dtype(name)


def _init(stddev: float):
    return nn.initializers.normal(stddev=stddev)


def einsum_dense(spec: str, x: Array, w: Array, **kwargs: Any) -> Array:
    """The weight projections' matmul: `jnp.einsum(spec, x, w)`, x [B, T, ...] first.

    Every projection by a parameter goes through a module's `dense` attribute (this function
    by default), so a caller can swap in another implementation of the same contraction, e.g.
    sampling.py's matrix-vector form for batch-1 decoding on CPU.

    Projections ("BTD,DNH->BTNH", "BTNH,NHD->BTD", "BTD,VD->BTV", ...) run as one 2-D matmul
    over flattened tokens: XLA:CPU runs the backward pass of [B*T, D] x [D, F] about twice as
    fast as that of the equivalent 3-D einsum.
    """
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    shared = "".join(ch for ch in xs if ch in ws)
    n = len(shared)
    lead, rest = xs[: len(xs) - n], ws.replace(shared, "")
    if not (n and xs.endswith(shared) and shared in ws and out == lead + rest):
        return jnp.einsum(spec, x, w, **kwargs)
    k = int(np.prod(x.shape[len(lead) :]))
    x2 = x.reshape(-1, k)
    if ws.startswith(shared):  # w [contracted..., out...]
        out_shape = w.shape[n:]
        w2, dims = w.reshape(k, -1), (((1,), (0,)), ((), ()))
    elif ws.endswith(shared):  # w [out..., contracted...] (a tied embedding)
        out_shape = w.shape[: w.ndim - n]
        w2, dims = w.reshape(-1, k), (((1,), (1,)), ((), ()))
    else:
        return jnp.einsum(spec, x, w, **kwargs)
    y = jax.lax.dot_general(x2, w2, dims, **kwargs)
    return y.reshape(*x.shape[: len(lead)], *out_shape)


# ----------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] with Llama 3.1 scaling, in float32 like the reference."""
    h = config.head_dim
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_scaling_factor is None:
        return inv_freq
    factor = np.float32(config.rope_scaling_factor)
    low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
    old_len = np.float32(config.rope_original_max_len)
    wavelen = np.float32(2 * np.pi) / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # in between interpolated smoothly.
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates feature pairs (i, i + H/2) of x [B, T, *, H] by angle positions[B, T] * freq."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    config: ModelConfig
    dense: Callable[..., Array] = einsum_dense

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None,
        cache: dict[str, Array] | None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """x [B, T, D], positions [B, T] -> ([B, T, D], updated cache {k, v: [B, K, S, H]})."""
        c = self.config
        d, n, kh, h = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        dtype, pdtype = _dtype(c.dtype), _dtype(c.param_dtype)

        def weight(name, shape, axes, stddev=0.02):
            w = self.param(name, nn.with_logical_partitioning(_init(stddev), axes), shape, pdtype)
            return w.astype(dtype)

        wq = weight("wq", (d, n, h), ("embed", "heads", "head_dim"))
        wk = weight("wk", (d, kh, h), ("embed", "kv_heads", "head_dim"))
        wv = weight("wv", (d, kh, h), ("embed", "kv_heads", "head_dim"))
        wo = weight("wo", (n, h, d), ("heads", "head_dim", "embed"), 0.02 / np.sqrt(2 * c.n_layers))

        q = self.dense("BTD,DNH->BTNH", x, wq)
        k = self.dense("BTD,DKH->BTKH", x, wk)
        v = self.dense("BTD,DKH->BTKH", x, wv)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "act_kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")

        inv_freq = rope_inv_freq(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        if cache is not None:
            # Each row writes its new keys at its own positions; slots past a row's current
            # position may hold stale values (padding, an earlier request) and are masked.
            # (rows [B, 1], :, positions [B, T]) indexes [B, T, K, H], k's own layout.
            rows = jnp.arange(x.shape[0])[:, None]
            cache = {
                "k": cache["k"].at[rows, :, positions].set(k.astype(cache["k"].dtype)),
                "v": cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype)),
            }
            keys, values = cache["k"].astype(dtype), cache["v"].astype(dtype)
            mask = attention_mask(positions, keys.shape[2], None, None)
            out = xla_attention(q, keys, values, mask, kv_layout="BKSH")
        else:
            out = attend(q, k, v, positions, segment_ids, c.attention_impl)  # attention.py

        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", "head_dim"))
        return self.dense("BTNH,NHD->BTD", out, wo), cache


# ----------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """SwiGLU: w_down(silu(x w_gate) * (x w_up))."""

    config: ModelConfig
    dense: Callable[..., Array] = einsum_dense

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dtype, pdtype = _dtype(c.dtype), _dtype(c.param_dtype)

        def weight(name, shape, axes, stddev=0.02):
            w = self.param(name, nn.with_logical_partitioning(_init(stddev), axes), shape, pdtype)
            return w.astype(dtype)

        w_gate = weight("w_gate", (c.dim, c.mlp_dim), ("embed", "mlp"))
        w_up = weight("w_up", (c.dim, c.mlp_dim), ("embed", "mlp"))
        w_down = weight(
            "w_down", (c.mlp_dim, c.dim), ("mlp", "embed"), 0.02 / np.sqrt(2 * c.n_layers)
        )
        gate = self.dense("BTD,DF->BTF", x, w_gate)
        up = self.dense("BTD,DF->BTF", x, w_up)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return self.dense("BTF,FD->BTD", hidden, w_down)


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    config: ModelConfig
    dense: Callable[..., Array] = einsum_dense

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None,
        cache: dict[str, Array] | None,
    ) -> tuple[Array, dict[str, Array] | None]:
        c = self.config
        dtype, pdtype = _dtype(c.dtype), _dtype(c.param_dtype)
        norm = functools.partial(RMSNorm, c.norm_eps, dtype, pdtype)
        h, cache = Attention(c, self.dense, name="attention")(
            norm(name="attention_norm")(x), positions, segment_ids, cache
        )
        x = x + h
        x = x + MLP(c, self.dense, name="mlp")(norm(name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"
    ),
}


# ----------------------------------------------------------------------------- transformer
class Transformer(nn.Module):
    """Llama 3: tokens [B, T] -> float32 logits [B, T, V] (and the updated KV cache)."""

    config: ModelConfig
    dense: Callable[..., Array] = einsum_dense

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: Cache | None = None,
        logits_at: Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[Array, Cache | None]:
        """Runs the model.

        Args:
          tokens: int [B, T].
          positions: int [B, T], RoPE positions (and cache slots when decoding); defaults to
            0..T-1 per row.
          segment_ids: int [B, T]; tokens attend only within their segment (packed documents).
            Ignored when decoding with a cache (each row holds one sequence).
          cache: from `init_cache`; when given, keys/values are written at `positions` and
            queries see cache slots <= their position.
          logits_at: int [B, P]; when given, only these time indices of each row are projected
            to logits (e.g. each prompt's last token when prefilling a cache), saving the
            [B, T, V] output projection.
          return_hidden: return the final-normed hidden states [B, T, D] instead of logits,
            for a loss that applies the output head itself (loss.py's chunked cross-entropy,
            which never materialises [B*T, V] logits). The head params are still created.

        Returns:
          (logits float32 [B, T, V] (or [B, P, V] with logits_at; [B, T, D] in the model dtype
          with return_hidden), updated cache or None)
        """
        c = self.config
        dtype, pdtype = _dtype(c.dtype), _dtype(c.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if cache is not None:
            segment_ids = None

        embed = self.param(
            "embedding",
            nn.with_logical_partitioning(_init(0.02), ("vocab", "embed")),
            (c.vocab_size, c.dim),
            pdtype,
        )
        x = jnp.take(embed, tokens, axis=0).astype(dtype)  # [B, T, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = Block
        if c.remat_policy != "none":
            # prevent_cse=False is safe under scan and lets XLA fuse across the remat boundary.
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        if c.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dense, name="layers")
            x, cache = layers(x, positions, segment_ids, cache)
        else:
            new_cache = []
            for i in range(c.n_layers):
                layer_cache = None if cache is None else cache[i]
                x, layer_cache = block(c, self.dense, name=f"layers_{i}")(
                    x, positions, segment_ids, layer_cache
                )
                new_cache.append(layer_cache)
            cache = None if cache is None else tuple(new_cache)

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)  # [B, P, D]
        x = RMSNorm(c.norm_eps, dtype, pdtype, name="final_norm")(x)
        if c.tie_embeddings:
            if return_hidden:
                return x, cache
            logits = self.dense(
                "BTD,VD->BTV", x, embed.astype(dtype), preferred_element_type=jnp.float32
            )
        else:
            kernel = self.param(
                "lm_head",
                nn.with_logical_partitioning(_init(0.02), ("embed", "vocab")),
                (c.dim, c.vocab_size),
                pdtype,
            )
            if return_hidden:
                return x, cache
            logits = self.dense(
                "BTD,DV->BTV", x, kernel.astype(dtype), preferred_element_type=jnp.float32
            )
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits, cache


# ----------------------------------------------------------------------------- helpers
def init_params(config: ModelConfig, rng: Array, batch_size: int = 1, seq_len: int = 8) -> Any:
    """Boxed (logically partitioned) params; wrap in jax.eval_shape for an abstract tree."""
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    # Params do not depend on the attention kernel; tracing with plain XLA lets a GPU/TPU
    # config be built (or eval_shape'd) on any host.
    config = dataclasses.replace(config, attention_impl="xla")
    return Transformer(config).init(rng, tokens)["params"]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: str | None = None):
    """Zeroed KV cache for `batch_size` rows of `max_len` slots, laid out for the model."""
    dt = _dtype(dtype or config.dtype)
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)  # [B, K, S, H]
    if config.scan_layers:
        full = (config.n_layers, *shape)
        return {"k": jnp.zeros(full, dt), "v": jnp.zeros(full, dt)}
    return tuple(
        {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(config.n_layers)
    )


def cache_logical_axes(config: ModelConfig):
    """Logical axes of the cache tree returned by `init_cache`."""
    if config.scan_layers:
        return {"k": CACHE_AXES, "v": CACHE_AXES}
    return tuple({"k": CACHE_AXES[1:], "v": CACHE_AXES[1:]} for _ in range(config.n_layers))


def unstack_layers(params: Any, n_layers: int) -> Any:
    """Scanned param tree -> per-layer tree (`layers_0`, ...) for `scan_layers=False`."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params


def stack_layers(params: Any, n_layers: int) -> Any:
    """Per-layer param tree -> scanned tree with a leading [L] axis."""
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    return params
