"""Low-rank adapters (LoRA): which params, init, apply, merge.

A target weight W (per layer `[*in, *out]`, e.g. wq [D, N, H], wo [N, H, D]) is used as
`W + (alpha / r) * A @ B` with A `[*in, R]` and B `[R, *out]` (R the rank). A starts random and
B at zero, so step 0 is exactly the base model.

LoRA enters through the param tree, not through model.py: `combine(base, adapters)` puts a
`LoraWeight` (a pytree of W, A, B) where the tree holds W, and `lora_dense`, passed as the
model's `dense` projection, computes `x W + scale * (x A) B` for such a leaf and the plain
projection for every other. The factored form never builds the [*in, *out] update, so the
backward pass computes no gradient for W at all. `nn.scan` slices every leaf of a LoraWeight
along the layer axis like any param, so scanned layers, remat and every mesh work unchanged.

Adapter tree (mirrors the params tree; stacked layers carry the leading [L] axis):
  layers/attention/{wq, wk, wv, wo}/{a, b}
  layers/mlp/{w_gate, w_up, w_down}/{a, b}

PEFT's layout is the transpose: `lora_A.weight` [R, in] is our A.T and `lora_B.weight` [out, R]
our B.T, with the head dims flattened (see peft_format.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llama_jax.model.transformer import einsum_dense

Array = jax.Array

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# target -> (module under a layer, number of leading per-layer dims that are inputs)
_WHERE = {
    "wq": ("attention", 1),
    "wk": ("attention", 1),
    "wv": ("attention", 1),
    "wo": ("attention", 2),
    "w_gate": ("mlp", 1),
    "w_up": ("mlp", 1),
    "w_down": ("mlp", 1),
}
# Logical axes of each target weight (per layer), as model.py declares them.
_AXES = {
    "wq": ("embed", "heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
      rank: R, the inner dimension of A @ B (> 0).
      alpha: the update is scaled by alpha / rank (PEFT's `lora_alpha`).
      dropout: dropout on the adapter's input x (as PEFT's `lora_dropout`), training only.
      targets: a subset of TARGETS.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora rank must be an integer > 0, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError(f"lora targets is empty; valid targets: {', '.join(TARGETS)}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(
                f"unknown lora target(s) {', '.join(map(repr, bad))}; valid: {', '.join(TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora targets repeat a name: {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str | Sequence[str]) -> tuple[str, ...]:
    """'all' or 'wq,wv' (or a sequence of names) -> a tuple of target names, in TARGETS order."""
    if isinstance(text, str):
        names = TARGETS if text.strip() == "all" else [t.strip() for t in text.split(",") if t]
    else:
        names = list(text)
    bad = [t for t in names if t not in TARGETS]
    if bad:
        raise ValueError(
            f"unknown lora target(s) {', '.join(map(repr, bad))}; valid: {', '.join(TARGETS)} "
            "(or 'all')"
        )
    return tuple(t for t in TARGETS if t in names)


# ----------------------------------------------------------------------------- the weight
@struct.dataclass
class LoraWeight:
    """A target weight with its adapter, in place of the array W in the params tree.

    `w` comes first: Flax checks a stored param's shape against its first leaf.
    """

    w: Array  # [*in, *out]
    a: Array  # [*in, R]
    b: Array  # [R, *out]
    dropout_key: Array | None = None  # uint32 key data; None: no dropout
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    def astype(self, dtype: Any) -> LoraWeight:
        return self.replace(w=self.w.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))


def lora_dense(spec: str, x: Array, w: Any, **kwargs: Any) -> Array:
    """The model's projection with adapters: `x W + scale * (dropout(x) A) B` for a LoraWeight.

    Args:
      spec: the projection's einsum, e.g. "BTD,DNH->BTNH" (contracted letters lead the weight's).
      x: the input, [B, T, *in].
      w: an array (plain projection) or a LoraWeight.
    """
    if not isinstance(w, LoraWeight):
        return einsum_dense(spec, x, w, **kwargs)
    y = einsum_dense(spec, x, w.w, **kwargs)
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    n_in = w.a.ndim - 1
    contracted, rest = ws[:n_in], ws[n_in:]
    lead = xs[: len(xs) - n_in]
    xa = x
    if w.dropout > 0.0 and w.dropout_key is not None:
        keep = jax.random.bernoulli(
            jax.random.wrap_key_data(w.dropout_key), 1.0 - w.dropout, x.shape
        )
        xa = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
    h = einsum_dense(f"{xs},{contracted}R->{lead}R", xa, w.a)
    delta = einsum_dense(f"{lead}R,R{rest}->{out}", h, w.b)
    return y + (w.scale * delta).astype(y.dtype)


# ----------------------------------------------------------------------------- the tree
def _layer_keys(params: Any) -> list[str]:
    keys = [k for k in params if k == "layers" or k.startswith("layers_")]
    if not keys:
        raise ValueError(f"params have no 'layers' subtree (keys: {sorted(params)})")
    return keys


def init_adapters(
    params: Any, lora: LoraConfig, rng: Array, stacked: bool | None = None
) -> dict[str, Any]:
    """Adapters for `params` (arrays or ShapeDtypeStructs): A uniform like PEFT's, B zero.

    A is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), in
    float32 whatever the base dtype; B is zero, so the adapted model starts equal to the base.

    Returns:
      The adapter tree, boxed with logical axes (nn.LogicallyPartitioned); unbox to use.
    """
    out: dict[str, Any] = {}
    for key in _layer_keys(params):
        layer = params[key]
        is_stacked = key == "layers" if stacked is None else stacked
        for t in lora.targets:
            module, n_in = _WHERE[t]
            w = layer[module][t]
            w_shape = tuple(nn.unbox(w).shape)
            lead = w_shape[:1] if is_stacked else ()
            per = w_shape[len(lead) :]
            a_shape = (*lead, *per[:n_in], lora.rank)
            b_shape = (*lead, lora.rank, *per[n_in:])
            fan_in = int(np.prod(per[:n_in]))
            rng, sub = jax.random.split(rng)
            bound = 1.0 / np.sqrt(fan_in)
            a = jax.random.uniform(sub, a_shape, jnp.float32, -bound, bound)
            b = jnp.zeros(b_shape, jnp.float32)
            layer_axes = ("layers",) if lead else ()
            axes = _AXES[t]
            out.setdefault(key, {}).setdefault(module, {})[t] = {
                "a": nn.LogicallyPartitioned(a, (*layer_axes, *axes[:n_in], None)),
                "b": nn.LogicallyPartitioned(b, (*layer_axes, None, *axes[n_in:])),
            }
    return out


def combine(
    params: Any, adapters: Any, lora: LoraConfig, dropout_rng: Array | None = None
) -> dict[str, Any]:
    """The params tree with each adapted weight replaced by a LoraWeight (for `lora_dense`).

    Args:
      params: the (frozen) base params.
      adapters: the tree of `init_adapters` (unboxed).
      lora: rank, alpha, dropout.
      dropout_rng: a key for adapter dropout (training); None disables dropout.
    """
    out = dict(params)
    for k, (key, layer_adapters) in enumerate(sorted(adapters.items())):
        layer = dict(out[key])
        for module, targets in layer_adapters.items():
            mod = dict(layer[module])
            for t, ab in targets.items():
                w = mod[t]
                key_data = None
                if dropout_rng is not None and lora.dropout > 0.0:
                    sub = jax.random.fold_in(dropout_rng, k * len(TARGETS) + TARGETS.index(t))
                    n = w.shape[0] if key == "layers" else None
                    keys = jax.random.split(sub, n) if n else sub
                    key_data = jax.random.key_data(keys)
                mod[t] = LoraWeight(
                    w, ab["a"], ab["b"], key_data, scale=lora.scale, dropout=lora.dropout
                )
            layer[module] = mod
        out[key] = layer
    return out


def delta(a: Array, b: Array, w_shape: Sequence[int], stacked: bool) -> Array:
    """A @ B as a [*in, *out] (per-layer, or [L, ...] when stacked) float32 update."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    lead = a.shape[:1] if stacked else ()
    r = a.shape[-1]
    a2 = a.reshape(*lead, -1, r)
    b2 = b.reshape(*lead, r, -1)
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(tuple(w_shape))


def merge(params: Any, adapters: Any, scale: float) -> dict[str, Any]:
    """Base params with every adapter folded in: W + scale * A @ B, in W's dtype.

    Computed in float32 on the host (numpy in, numpy out), so it works on any params tree.
    """
    out = dict(params)
    for key, layer_adapters in adapters.items():
        layer = dict(out[key])
        for module, targets in layer_adapters.items():
            mod = dict(layer[module])
            for t, ab in targets.items():
                w = np.asarray(mod[t])
                d = np.asarray(delta(ab["a"], ab["b"], w.shape, key == "layers"))
                mod[t] = (w.astype(np.float32) + np.float32(scale) * d).astype(w.dtype)
            layer[module] = mod
        out[key] = layer
    return out


def count(adapters: Any) -> int:
    """Number of adapter parameters."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(adapters)))
