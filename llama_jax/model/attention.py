"""Causal grouped-query attention kernels: plain XLA, cuDNN flash (GPU), Pallas splash (TPU).

Einsum letters as in transformer.py: B batch, T query length, S key length, N query heads,
K key/value heads, G = N // K query heads per key/value head, H head dim.

`attend` is what the transformer (transformer.py) calls; the kernel is `ModelConfig.attention_impl`:

  xla     portable; a boolean [B, T, S] mask (causal and same-segment), float32 softmax.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`; bfloat16/float16 only, head
          dim a multiple of 8 (checked up front by `check_cudnn`, before XLA says it less clearly).
  splash  the TPU Pallas splash kernel. A Mosaic kernel cannot be partitioned by XLA, so it
          runs inside `shard_map`: batch split over the mesh axes the `batch` logical axis maps
          to and heads over those of `act_heads` / `act_kv_heads` (the rules in sharding.py;
          no mesh axis is named here), one kernel per local row with the grouped-query form
          (K key/value heads, no repeat), segment ids for packed rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llama_jax.model.sharding import LOGICAL_RULES

Array = jax.Array

# Splash tiles: the kernel's key blocks must be multiples of the 128 lanes of a TPU vreg; 512 is
# the block MaxText uses by default for long sequences (fewer grid steps, same VMEM budget).
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 256  # Hopper and later; 128 before (jax checks the GPU at run time)


# ----------------------------------------------------------------------------- xla
def attention_mask(
    q_slots: Array, kv_len: int, segment_ids: Array | None, kv_segment_ids: Array | None
) -> Array:
    """Boolean [B, T, S]: key slot s is visible to query t iff s <= q_slots[b, t] and both
    belong to the same segment (packed documents never attend across each other)."""
    mask = jnp.arange(kv_len)[None, None, :] <= q_slots[:, :, None]
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def xla_attention(q: Array, k: Array, v: Array, mask: Array, kv_layout: str = "BSKH") -> Array:
    """Grouped-query attention in plain XLA, for K/V in either layout.

    Args:
      q: [B, T, N, H]; mask: bool [B, T, S].
      k, v: [B, S, K, H] (kv_layout "BSKH": projected keys and values) or [B, K, S, H]
        ("BKSH": the KV cache's layout).
    Returns:
      [B, T, N, H]
    """
    if kv_layout not in ("BSKH", "BKSH"):
        raise ValueError(f"kv_layout={kv_layout!r}; valid: 'BSKH', 'BKSH'")
    b, t, n, h = q.shape
    kh = k.shape[kv_layout.index("K")]
    q = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    logits = jnp.einsum(f"BTKGH,{kv_layout}->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / np.sqrt(h))
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"BKGTS,{kv_layout}->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


# ----------------------------------------------------------------------------- cudnn
def check_cudnn(q: Array, k: Array, v: Array, segment_ids: Array | None) -> None:
    """Raises a ValueError naming the value when cuDNN flash attention cannot take these inputs.

    The constraints are those jax.nn.dot_product_attention(implementation="cudnn") enforces
    for bfloat16/float16 flash attention (jax/_src/cudnn/fused_attention_stablehlo.py:
    check_layout, check_is_flash_attention); jax reports them only on a GPU, mid-compile.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"cudnn attention takes [B, T, N, H] inputs, got q {q.shape}, k {k.shape}")
    dt = jnp.dtype(q.dtype).name
    if dt not in CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"attention_impl='cudnn' needs bfloat16 or float16 activations, got q {dt}, k "
            f"{jnp.dtype(k.dtype).name}, v {jnp.dtype(v.dtype).name}; set model.dtype="
            "'bfloat16' or attention_impl='xla'"
        )
    h = q.shape[-1]
    if h % 8 or h > CUDNN_MAX_HEAD_DIM:
        raise ValueError(
            f"attention_impl='cudnn' needs a head dim that is a multiple of 8 and <= "
            f"{CUDNN_MAX_HEAD_DIM} (128 before Hopper), got {h}; use attention_impl='xla'"
        )
    n, kh = q.shape[2], k.shape[2]
    if n % kh:
        raise ValueError(f"cudnn attention: {n} query heads are not a multiple of {kh} kv heads")
    t = q.shape[1]
    if segment_ids is not None and t % 2:
        # Segments become a bias; cuDNN's training kernels with a bias need even lengths.
        raise ValueError(f"attention_impl='cudnn' with segment ids needs an even length, got {t}")


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
    """cuDNN flash attention (GPU), causal, with segments.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; segment_ids: int [B, T] or None.
    Returns:
      [B, T, N, H]
    """
    check_cudnn(q, k, v, segment_ids)
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


# ----------------------------------------------------------------------------- splash
def splash_block(t: int) -> int:
    """The largest splash tile that divides the sequence length `t` (a ValueError if none)."""
    for block in SPLASH_BLOCKS:
        if t % block == 0:
            return block
    raise ValueError(
        f"attention_impl='splash' needs a sequence length that is a multiple of {SPLASH_LANES} "
        f"(the TPU lane width its key blocks are tiled by), got {t}; pick seq_len = "
        f"{-(-t // SPLASH_LANES) * SPLASH_LANES} or attention_impl='xla'"
    )


def _splash_kernel(heads: int, t: int, interpret: bool):
    """The causal splash kernel for `heads` local query heads of length `t`.

    A pytree: its block-sparse mask tables are arrays of the program being traced (made anew per
    trace; a kernel kept across traces would leak one trace's values into another).
    """
    # Deferred: the Pallas TPU modules load only when splash is used.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = splash_block(t)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    # make_splash_mha takes k/v with fewer heads than q (grouped-query: query head n reads
    # key/value head n // G); head_shards=1 because shard_map has already split the heads.
    return sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _mesh_spec(logical: tuple[str, ...], mesh_axes: tuple[str, ...]) -> PartitionSpec:
    """PartitionSpec of `logical` axes under the active rules (sharding.py's when none are
    set), keeping only the mesh axes this mesh has."""
    rules = nn.get_logical_axis_rules() or LOGICAL_RULES
    spec = nn.logical_to_mesh_axes(logical, rules)
    out = []
    for entry in spec:
        axes = entry if isinstance(entry, tuple) else (entry,)
        axes = tuple(a for a in axes if a is not None and a in mesh_axes)
        out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*out)


def _mesh_size(mesh, entry) -> int:
    """Devices along a PartitionSpec entry (None, one mesh axis or a tuple of them)."""
    if entry is None:
        return 1
    axes = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def splash_attention(
    q: Array, k: Array, v: Array, segment_ids: Array | None, interpret: bool | None = None
) -> Array:
    """TPU splash attention, causal, grouped-query, with segment ids; inside shard_map.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; segment_ids: int [B, T] or None (one segment).
      interpret: run the kernel in the Pallas interpreter; default: when the mesh (or, with
        none, the default backend) is a CPU.

    On TPU, Mosaic refuses the kernel's bf16 dots under jax_default_matmul_precision="highest"
    ("Bad lhs type"): leave that setting at its default there.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"splash attention: {n} query heads are not a multiple of {kh} kv heads")
    splash_block(t)  # the clear error before any tracing of the kernel
    mesh = jax.sharding.get_abstract_mesh()
    if interpret is None:
        device = None if mesh.empty else mesh.abstract_device
        platform = device.platform if device is not None else jax.default_backend()
        interpret = platform == "cpu"
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    names = tuple(mesh.axis_names)
    q_spec = _mesh_spec(("batch", "length", "act_heads", "head_dim"), names)
    kv_spec = _mesh_spec(("batch", "length", "act_kv_heads", "head_dim"), names)
    seg_spec = _mesh_spec(("batch", "length"), names)
    if q_spec[1] is not None:
        raise ValueError(
            f"splash attention cannot split the sequence over mesh axis {q_spec[1]!r}; map the "
            "'length' logical axis to None"
        )
    for spec, count, what in ((q_spec, n, "query"), (kv_spec, kh, "kv")):
        size = _mesh_size(mesh, spec[2])
        if count % size:
            raise ValueError(
                f"splash attention: {count} {what} heads do not split over mesh axes {spec[2]} "
                f"of size {size}"
            )
    # Built out here and passed in replicated: inside the body its mask tables would be made
    # per device of the manual mesh.
    kernel = _splash_kernel(n // _mesh_size(mesh, q_spec[2]), t, interpret)
    dtype = q.dtype
    q = q * jnp.asarray(1.0 / np.sqrt(h), dtype)  # the kernel applies no scale of its own

    def local(kernel, q, k, v, seg):
        # Deferred like _splash_kernel's: the Pallas TPU modules load only when splash is used.
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

        # [b, T, n, H] -> [b, n, T, H]: the kernel's head-major layout, one row at a time.
        qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        out = jax.vmap(
            lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1))
        )(qt, kt, vt, seg)
        # The kernel accumulates in float32; the residual stream stays in the model dtype.
        return jnp.swapaxes(out, 1, 2).astype(dtype)

    if mesh.empty:
        return local(kernel, q, k, v, segment_ids)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            jax.tree.map(lambda _: PartitionSpec(), kernel),
            q_spec,
            kv_spec,
            kv_spec,
            seg_spec,
        ),
        out_specs=q_spec,
        check_vma=False,  # the Pallas call carries no varying-axes annotations
    )(kernel, q, k, v, segment_ids)


# ----------------------------------------------------------------------------- dispatch
def attend(
    q: Array, k: Array, v: Array, positions: Array, segment_ids: Array | None, impl: str
) -> Array:
    """Causal self-attention of one sequence block (no cache) with the chosen kernel.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; positions: int [B, T] (only its shape is used:
        causality is by slot); segment_ids: int [B, T] or None; impl: "xla", "cudnn", "splash".
    Returns:
      [B, T, N, H]
    """
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids)
    if impl != "xla":
        raise ValueError(f"attention_impl={impl!r}; valid: 'xla', 'cudnn', 'splash'")
    t = q.shape[1]
    q_slots = jnp.broadcast_to(jnp.arange(t)[None], positions.shape)
    mask = attention_mask(q_slots, t, segment_ids, segment_ids)
    return xla_attention(q, k, v, mask)
