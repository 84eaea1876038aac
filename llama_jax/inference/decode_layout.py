"""The params laid out for decoding, and the matmul that reads them at memory speed on CPU.

XLA:CPU's bfloat16 matrix-vector product first writes a float32 copy of the whole weight; a
`dot` is fused with its bf16->f32 conversion (reading the weight once) only when the contracted
dimension is the weight's contiguous last one and the vector is a flat buffer under 16 KiB. So
on CPU with 16-bit weights each projection is stored as contiguous [C, M, Kc] chunks and
`matvec_dense` (plugged into the model's `dense` hook) produces exactly that pattern.

  matvec_dense           the projections' matmul for weights in the matvec layout.
  resolve_layout         "auto" -> "matvec" for 16-bit or int8 weights on CPU, else "standard".
  quantize_matvec_params int8 weights in the matvec layout (their conversion fuses the same way).
  quantize_tied_head     an int8 copy of a tied embedding for the output projection only
                         (the lookup keeps the table), and `tied_head` to read it back.
  quantize_decode_params int8 decode params: the projections, plus that copy when tied.
  prepare_decode_params  the params laid out for decoding (layers unrolled; projections in the
                         matvec layout where chosen), on the model's mesh.
  decode_compiler_options  XLA options for the jitted decode steps (CPU float32: no YNN dots).
  float_buffers          the float buffers a compiled step writes (finds dequantised copies).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model import sharding
from llama_jax.model.config import DTYPES, ModelConfig
from llama_jax.model.quantize import PROJECTIONS, QWeight, quantize_params, quantize_weight
from llama_jax.model.transformer import (
    init_params,
    unstack_layers,
)

Array = jax.Array

TIED_HEAD = "int8_tied_head"  # int8 decode params' copy of a tied embedding, for the head
MATVEC_MAX = 3072  # longest vector XLA:CPU fuses into a matrix-vector loop (< 16 KiB in f32)
MATVEC_CHUNK = 2048  # chunk length when a contraction is longer than MATVEC_MAX
LAYOUTS = ("auto", "standard", "matvec")


# ----------------------------------------------------------------------------- decode layout
# Projections (the weights below) are quantize.PROJECTIONS: leaf name -> (letters of the model's
# layout, contracted letters), matching model.py's einsums (the cache-vs-recompute tests check).
def _n_chunks(k: int) -> int:
    """Contraction chunks for a matrix-vector product over k elements (see matvec_dense)."""
    if k <= MATVEC_MAX:
        return 1
    return next(c for c in range(2, k + 1) if k % c == 0 and k // c <= MATVEC_CHUNK)


def _as_chunks(w: Array, letters: str, contract: str) -> Array:
    """A weight in the model's layout -> [C, M, Kc]: free dims merged into M, the contracted
    ones into C contiguous chunks of Kc (the matvec layout)."""
    free = [c for c in letters if c not in contract]
    w = jnp.transpose(w, [letters.index(c) for c in free + list(contract)])
    m = math.prod(w.shape[: len(free)])
    k = math.prod(w.shape[len(free) :])
    c = _n_chunks(k)
    return jnp.transpose(w.reshape(m, c, k // c), (1, 0, 2))


def _from_chunks(s: Array, letters: str, contract: str, shape: Sequence[int]) -> Array:
    """Inverse of `_as_chunks`: [C, M, Kc] -> the model's layout `shape` (lazy inside jit)."""
    dims = dict(zip(letters, shape))
    free = [c for c in letters if c not in contract]
    order = free + list(contract)
    w = jnp.transpose(s, (1, 0, 2)).reshape([dims[c] for c in order])
    return jnp.transpose(w, [order.index(c) for c in letters])


def _projection(path: tuple[Any, ...]) -> tuple[str, str] | None:
    """(layout letters, contracted letters) of a projection weight (quantize.PROJECTIONS)."""
    return PROJECTIONS.get(getattr(path[-1], "key", None))


def matvec_dense(spec: str, x: Array, w: Array, **kwargs: Any) -> Array:
    """`einsum_dense` for weights stored in the matvec layout [C, M, Kc] (see `_as_chunks`).

    The Sampler stores each projection weight as [C, M, Kc] and restores the model's layout
    inside jit; this function rearranges it back, which XLA cancels, so the dots below read the
    stored array directly. For a single row (batch-1 decoding) they are rank-1 `dot`s of at
    most MATVEC_MAX elements against a contiguous [M, Kc] chunk: XLA:CPU then fuses the
    bf16->f32 conversion into a matrix-vector loop that streams the weight at memory speed. Its
    default bf16 path first materialises an f32 copy of the weight, about 20x slower; vectors of
    16 KiB or more are not fused (hence the chunks), a vector operand that is a view of a
    multi-dimensional array defeats vectorisation (hence the copy into a flat buffer), and an add
    consuming a dot is fused into it, losing the weight's fusion (hence partial results are
    combined through a buffer). More rows use ordinary GEMMs per chunk.

    Args:
      spec: a projection einsum from model.py, "<batch letters><contracted>,<weight>-><batch
        letters><free>", e.g. "BTD,DNH->BTNH".
      x: [B, T, *contracted].
      w: the weight in the model's layout (a rearrangement of the stored [C, M, Kc] array).
      **kwargs: `preferred_element_type` as for jnp.einsum.

    Returns:
      [B, T, *free], in preferred_element_type or the inputs' dtype.
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    contract = "".join(c for c in rhs if c in lhs)
    free = "".join(c for c in rhs if c not in lhs)
    n_lead = len(lhs) - len(contract)
    if lhs[n_lead:] != contract or out != lhs[:n_lead] + free:
        raise ValueError(
            f"matvec_dense cannot run {spec!r}: it needs x's contracted letters last and in the "
            "weight's order, and the output as x's leading letters then the weight's free ones"
        )
    unknown = set(kwargs) - {"preferred_element_type"}
    if unknown:
        raise ValueError(f"matvec_dense got unsupported arguments {sorted(unknown)}")
    scale = None
    if isinstance(w, QWeight):  # int8 chunks: the int8 -> f32 conversion fuses into the dots too
        out_dtype = kwargs.get("preferred_element_type") or w.dtype
        scale = w.scale.reshape(-1)  # [M], stored as [1, M, 1] over the chunks
        w, x = w.q, x.astype(jnp.float32)
    else:
        out_dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
    free_shape = [w.shape[rhs.index(c)] for c in free]
    chunks = _as_chunks(w, rhs, contract)  # [C, M, Kc]
    if scale is not None:
        chunks = chunks.astype(jnp.float32)
    n_chunks, m, kc = chunks.shape
    lead = x.shape[:n_lead]
    rows = math.prod(lead)
    x2 = x.reshape(rows, n_chunks * kc)
    if rows == 1:
        # A flat copy of the vector: row 0 of a [2, K] buffer that XLA keeps as one array.
        flat = jax.lax.dynamic_update_slice(jnp.zeros((2, x2.shape[1]), x.dtype), x2, (0, 0))[0]
        parts = [jnp.dot(flat[i * kc : (i + 1) * kc], chunks[i].T, **_F32) for i in range(n_chunks)]
        y = parts[0]
        if n_chunks > 1:
            buf = jnp.zeros((n_chunks, m), jnp.float32)
            for i, part in enumerate(parts):
                buf = jax.lax.dynamic_update_slice(buf, part[None], (i, 0))
            y = buf.sum(0)
        y = y[None]
    else:
        y = sum(
            jnp.einsum("RK,MK->RM", x2[:, i * kc : (i + 1) * kc], chunks[i], **_F32)
            for i in range(n_chunks)
        )
    if scale is not None:
        y = y * scale
    return y.astype(out_dtype).reshape(*lead, *free_shape)


_F32 = {"preferred_element_type": jnp.float32}


def _to_model_layout(params: Any, model_shapes: Any) -> Any:
    """Matvec-layout params -> the model's layout (lazy rearrangements inside jit). An int8
    `QWeight` gets its q rearranged; its [1, M, 1] scale is read by `matvec_dense` as is."""

    def f(path, a, shape):
        proj = _projection(path)
        if proj is None:
            return a
        if isinstance(a, QWeight):
            return QWeight(_from_chunks(a.q, *proj, shape.shape), a.scale, a.dtype)
        return _from_chunks(a, *proj, shape.shape)

    return jax.tree_util.tree_map_with_path(
        f, params, model_shapes, is_leaf=lambda x: isinstance(x, QWeight)
    )


def quantize_matvec_params(params: Any) -> Any:
    """Matvec-layout params -> int8 {q [C, M, Kc], scale [1, M, 1]} for every projection: one
    scale per output channel, the max over the contracted C and Kc (quantize.py's scheme)."""

    def f(path, a):
        return a if _projection(path) is None else quantize_weight(a, "CMK", "CK")

    return jax.tree_util.tree_map_with_path(f, params)


def quantize_tied_head(embedding: Array, layout: str) -> dict[str, Array]:
    """int8 {q, scale} of a tied [V, D] embedding used as the output head ("BTD,VD->BTV"),
    one scale per vocabulary row: [C, V, Kc] chunks in the matvec layout, [V, D] otherwise.
    The table itself stays as it is for the embedding lookup, so this is a second copy (a
    quarter of a float32 table's bytes, half a bf16 one's) that halves the head's reads."""
    if layout == "matvec":
        return quantize_weight(_as_chunks(embedding, "VD", "D"), "CMK", "CK")
    return quantize_weight(embedding, "VD", "D")


def tied_head(head: dict[str, Array], layout: str, shape: Sequence[int], dtype: Any) -> QWeight:
    """The `QWeight` (model layout, [V, D]) of a `quantize_tied_head` result, inside jit."""
    q = _from_chunks(head["q"], "VD", "D", shape) if layout == "matvec" else head["q"]
    return QWeight(q, head["scale"], dtype)


def quantize_decode_params(params: Any, layout: str, tied: bool) -> Any:
    """Decode params (in `layout`) -> int8 ones: every projection, plus, for a tied
    embedding, its int8 head copy under TIED_HEAD (read back with `tied_head`). Jittable."""
    q = quantize_matvec_params(params) if layout == "matvec" else quantize_params(params)
    if tied:
        q = {**q, TIED_HEAD: quantize_tied_head(params["embedding"], layout)}
    return q


def _matvec_sharding(path, s: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a projection's [C, M, Kc] array from its model-layout sharding: M follows its
    major free dim, C (or Kc when C == 1) its major contracted dim, where sizes divide."""
    proj = _projection(path)
    if proj is None:
        return s
    letters, contract = proj
    spec = tuple(s.spec) + (None,) * (len(letters) - len(s.spec))
    axis = dict(zip(letters, spec))
    dims = dict(zip(letters, shape))
    mesh = s.mesh

    def size(a):
        return math.prod(mesh.shape[x] for x in ((a,) if isinstance(a, str) else a))

    def merged(group: str, n: int):
        # A merged dim can keep the major letter's axis only if the minor ones are unsharded.
        first = axis[group[0]]
        if first is None or any(axis[c] is not None for c in group[1:]) or n % size(first):
            return None
        return first

    free = "".join(c for c in letters if c not in contract)
    k = math.prod(dims[c] for c in contract)
    c = _n_chunks(k)
    m_axis = merged(free, math.prod(dims[x] for x in free))
    k_axis = merged(contract, c if c > 1 else k)
    new = (k_axis, m_axis, None) if c > 1 else (None, m_axis, k_axis)
    return NamedSharding(mesh, PartitionSpec(*new))


def resolve_layout(layout: str, config: ModelConfig, mesh: Mesh, quantized: bool = False) -> str:
    """ "auto" -> "matvec" on CPU for 16-bit or int8 weights (see matvec_dense), else
    "standard"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid: {LAYOUTS}")
    if layout != "auto":
        return layout
    cpu = mesh.devices.flat[0].platform == "cpu"
    narrow = quantized or config.dtype in ("bfloat16", "float16")
    return "matvec" if cpu and narrow else "standard"


# ----------------------------------------------------------------------------- HLO check
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_HLO_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(")
_NOT_A_BUFFER = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}


def float_buffers(hlo: str, min_elements: int) -> list[str]:
    """Floating-point buffers of at least `min_elements` that a compiled program writes.

    Only the instructions of unfused computations (the entry, loop bodies, branches) are
    buffers; what happens inside a fusion stays in registers. A decode step over int8 weights
    that writes none of a weight's size reads each weight once, as int8 (XLA did not convert it
    into a bf16/f32 copy first).

    Args:
      hlo: the optimised HLO text (`jax.jit(f).lower(...).compile().as_text()`).
      min_elements: the size that counts (e.g. the smallest weight's element count).

    Returns:
      One "name: dtype[dims] opcode" line per such buffer.
    """
    fused = set(re.findall(r"\bfusion\(.*?calls=%?([\w.\-]+)", hlo))
    fused |= set(re.findall(r"\bto_apply=%?([\w.\-]+)", hlo))
    out, current = [], None
    for line in hlo.splitlines():
        head = _HLO_COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            continue
        op = _HLO_OP.match(line)
        if op is None or current in fused:
            continue
        dtype, dims, opcode = op.groups()
        size = math.prod(int(d) for d in dims.split(",")) if dims else 1
        if dtype in ("f32", "bf16", "f16") and size >= min_elements and opcode not in _NOT_A_BUFFER:
            out.append(f"{current}: {dtype}[{dims}] {opcode}")
    return out


# XLA:CPU hands dots to YNNPACK by default. For the few-row float32 products of a decode step
# (B rows against a weight read from memory) its kernels are 2x slower than XLA's own: a 50M
# model's batch-8 step takes 36 ms with them and 17 ms without (bench/RESULTS.md). For 16-bit
# weights YNNPACK is the fast path (without it a bf16 GEMM first converts the whole weight).
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _xla_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's XLA knows these compiler options (flags come and go)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
        return True
    except Exception:  # noqa: BLE001 - an unknown option is all this checks for
        return False


def decode_compiler_options(config: ModelConfig, mesh: Mesh, quantized: bool = False) -> dict:
    """XLA compiler options for jitted decode steps: on CPU with float32 (unquantized) weights,
    dots stay off YNNPACK (see _NO_YNN); otherwise, or where XLA lacks the option, none."""
    cpu = mesh.devices.flat[0].platform == "cpu"
    f32 = jnp.dtype(config.param_dtype) == jnp.float32
    if cpu and not quantized and f32 and _xla_accepts(tuple(_NO_YNN.items())):
        return dict(_NO_YNN)
    return {}


def prepare_decode_params(
    params: Any,
    config: ModelConfig,
    mesh: Mesh,
    *,
    layout: str = "auto",
    unroll: bool = True,
    dtype: str | None = None,
    quantized: bool = False,
) -> tuple[Any, ModelConfig, str]:
    """Lays the params out for decoding, on the mesh, without a trip through the host.

    Args:
      params: the model's params (scanned or not), on device or host.
      config: their config.
      mesh: where the result lives (sharded by the model's logical axes).
      layout: "standard" (the model's layout), "matvec" ([C, M, Kc] projections for
        `matvec_dense`; needs unroll) or "auto" (see `resolve_layout`).
      unroll: store layers separately (`scan_layers=False`): a scan over layers re-slices the
        stacked weights and cache every step (PERF_NOTES: 5-8x slower decoding in MaxText).
      dtype: compute/param dtype for decoding (e.g. "float32"); None keeps config.dtype.
      quantized: the caller will quantize the result to int8 (this only steers "auto").

    Returns:
      (params, decode config, resolved layout)
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {DTYPES}")
    src_config = config
    changes: dict[str, Any] = {"remat_policy": "none"}
    if unroll:
        changes["scan_layers"] = False
    if dtype is not None:
        changes.update(param_dtype=dtype, dtype=dtype)
    config = dataclasses.replace(config, **changes)
    if layout == "auto" and not unroll:
        layout = "standard"
    layout = resolve_layout(layout, config, mesh, quantized)
    if layout == "matvec" and not unroll:
        raise ValueError("layout='matvec' needs unroll=True (per-layer weights)")
    abstract = nn.unbox(jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0)))
    shardings = sharding.logical_to_sharding(
        jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0)), mesh
    )
    if layout == "matvec":
        shardings = jax.tree_util.tree_map_with_path(
            lambda path, s, a: _matvec_sharding(path, s, a.shape), shardings, abstract
        )
    cast = jnp.dtype(config.param_dtype)

    def convert(p):
        if src_config.scan_layers and unroll:
            p = unstack_layers(p, config.n_layers)
        p = jax.tree.map(lambda a: a.astype(cast), p)
        if layout == "matvec":
            p = jax.tree_util.tree_map_with_path(
                lambda path, a: (
                    a if _projection(path) is None else _as_chunks(a, *_projection(path))
                ),
                p,
            )
        return p

    with jax.set_mesh(mesh):
        out = jax.jit(convert, out_shardings=shardings)(params)
    return out, config, layout
