"""int8 weight-only quantisation for inference, with one float32 scale per output channel.

Every projection weight (wq, wk, wv, wo, w_gate, w_up, w_down and an untied lm_head) is stored
as int8 `q` in the model's layout plus `scale` over its free (output) dims:
  w ~= q * scale,  scale = max |w| over the contracted dims / 127,  q = round(w / scale).
The embedding table, norms and a tied embedding stay in the compute dtype (the lookup reads a
few rows). For a tied table the `Sampler` adds an int8 copy that only the head reads
(`decode_layout.quantize_tied_head`): with Llama 3.2 1B's 128k x 2048 table that copy takes a
third of the bytes read per token from bf16 to int8.

The model is untouched: inside jit the {q, scale} dicts become `QWeight`s, which flax accepts as
params (their `.shape` is the weight's) and which `int8_dense` (the model's `dense` hook)
multiplies as (x @ q) * scale: the int8 weight is what is read, the scale is applied to the
[B, T, out] product rather than to the weight.

  quantize_params   params -> params with {q, scale} for every projection weight.
  dequantize        the inverse (float32), for tests and error measurement.
  int8_dense        the `dense` hook for `QWeight`s (falls through to einsum_dense otherwise).
  as_qweights       {q, scale} dicts -> QWeight objects (call inside jit, before model.apply).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.model.transformer import einsum_dense

Array = jax.Array

QUANTIZE = (None, "int8")  # valid `quantize=` values

# Projection weights by leaf name: (letters of the model's layout, contracted letters); the same
# table as decode_layout's (the model's einsums).
PROJECTIONS = {
    "wq": ("DNH", "D"),
    "wk": ("DKH", "D"),
    "wv": ("DKH", "D"),
    "wo": ("NHD", "NH"),
    "w_gate": ("DF", "D"),
    "w_up": ("DF", "D"),
    "w_down": ("FD", "F"),
    "lm_head": ("DV", "D"),
}


def check_quantize(quantize: str | None) -> str | None:
    """Validates a `quantize=` argument ("int8" or None; "none" and "" mean None)."""
    if quantize in ("none", ""):
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}; valid: 'int8' or None")
    return quantize


def _leaf_name(path) -> str | None:
    return getattr(path[-1], "key", None)


def quantize_weight(w: Array, letters: str, contract: str) -> dict[str, Array]:
    """{q int8, scale float32 (1 on the contracted dims)} of one weight whose trailing dims
    are `letters`; the scale is max |w| over `contract` / 127."""
    # Scanned layers put a leading [L] axis before the model's letters.
    lead = w.ndim - len(letters)
    axes = tuple(lead + letters.index(c) for c in contract)
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale}


def quantize_params(params: Any) -> Any:
    """Params (scanned or unrolled) -> the same tree with each projection weight replaced by
    {"q": int8 [same shape], "scale": float32 [same rank, 1 on the contracted dims]}. Jittable."""

    def f(path, a):
        proj = PROJECTIONS.get(_leaf_name(path))
        return a if proj is None else quantize_weight(a, *proj)

    return jax.tree_util.tree_map_with_path(f, params)


def is_quantized_leaf(x: Any) -> bool:
    return isinstance(x, dict) and set(x) == {"q", "scale"}


def dequantize(params: Any) -> Any:
    """The inverse of `quantize_params`: float32 weights q * scale."""
    return jax.tree.map(
        lambda x: x["q"].astype(jnp.float32) * x["scale"] if is_quantized_leaf(x) else x,
        params,
        is_leaf=is_quantized_leaf,
    )


@jax.tree_util.register_pytree_node_class
class QWeight:
    """An int8 weight and its scale inside a traced function. A pytree whose first leaf is q,
    so flax's param shape check (leaf by leaf, against the float weight) passes and nn.scan
    slices both parts per layer; `.astype` only records the compute dtype; `int8_dense` sees
    the parts."""

    def __init__(self, q: Array, scale: Array, dtype: Any = jnp.float32):
        self.q, self.scale, self.dtype = q, scale, jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.q, self.scale), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(*children, dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def astype(self, dtype: Any) -> QWeight:
        return QWeight(self.q, self.scale, jnp.dtype(dtype))


def as_qweights(params: Any) -> Any:
    """{q, scale} leaves -> QWeight (inside jit, so the arrays are tracers of the stored ones)."""
    return jax.tree.map(
        lambda x: QWeight(x["q"], x["scale"]) if is_quantized_leaf(x) else x,
        params,
        is_leaf=is_quantized_leaf,
    )


def int8_dense(spec: str, x: Array, w: Any, **kwargs: Any) -> Array:
    """`einsum_dense` for a `QWeight`: (x @ q) * scale, the scale taken over the weight's free
    dims in the output's order; any other weight goes to `einsum_dense` unchanged."""
    if not isinstance(w, QWeight):
        return einsum_dense(spec, x, w, **kwargs)
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    free = [c for c in ws if c not in xs]
    if out[len(out) - len(free) :] != "".join(free):
        raise ValueError(f"int8_dense cannot run {spec!r}: the weight's free letters must end it")
    out_dtype = kwargs.get("preferred_element_type") or w.dtype
    f32 = jnp.float32
    y = einsum_dense(spec, x.astype(w.dtype), w.q.astype(w.dtype), preferred_element_type=f32)
    scale = w.scale.reshape([w.q.shape[ws.index(c)] for c in free])  # drop the contracted 1s
    return (y * scale).astype(out_dtype)
