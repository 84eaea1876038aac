"""Text generation: jitted prefill and decode over a KV cache, token sampling, stop handling.

Bottom up:
  SamplingParams         temperature / top-k / top-p / min-p, validated.
  sample_tokens          greedy, or a seeded draw from the filtered distribution, for [B, V].
  matvec_dense           the projections' matmul for weights stored as contiguous [C, M, Kc]
                         chunks: batch-1 decoding runs as matrix-vector products that XLA:CPU
                         fuses with the bf16->f32 conversion (its bf16 GEMV is ~20x slower).
  prepare_decode_params  the params laid out for decoding (layers unrolled; on CPU with 16-bit
                         weights, projections in the matvec layout), on the model's mesh.
  Sampler                owns the decode params and the jitted functions: `prefill`,
                         `decode_step` (donates the cache), and the generation loop: `_start`
                         (prefill + first token) and `_run` (a `lax.while_loop` over decode
                         steps that exits once every row has stopped). Prompt, batch and cache
                         lengths are bucketed to powers of two, so new prompt lengths reuse
                         compiled code and a generation never compiles per token.
  Generation             one batch of prompts being generated, advanced from the host in
                         chunks (one chunk unless stop strings or streaming need a look).
  TextStream             incremental detokenisation that never splits a UTF-8 character and
                         ends the text before the first stop string.

Randomness: row r's token at step s is drawn with fold_in(fold_in(key(seed), r), s), so a result
depends on the seed, the row and the step only, not on bucketing, chunking or streaming.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import sharding
from llama_jax.config import DTYPES, ModelConfig
from llama_jax.model import (
    Transformer,
    cache_logical_axes,
    einsum_dense,
    init_cache,
    init_params,
    unstack_layers,
)

Array = jax.Array

MIN_BUCKET = 16  # shortest prompt / cache bucket: tiny prompts share one compilation
MATVEC_MAX = 3072  # longest vector XLA:CPU fuses into a matrix-vector loop (< 16 KiB in f32)
MATVEC_CHUNK = 2048  # chunk length when a contraction is longer than MATVEC_MAX
STOP_ID_SLOTS = 8  # stop ids are padded to a multiple of this, so their count rarely recompiles
LAYOUTS = ("auto", "standard", "matvec")


# ----------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits.

    Attributes:
      temperature: 0 is greedy (argmax); > 0 divides the logits before sampling.
      top_k: keep the k most likely tokens (0: no limit).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p,
        measured after top-k (1: no limit).
      min_p: keep tokens whose probability is at least min_p times the most likely one's (0: no
        limit). Filters apply in the order top-k, top-p, min-p, as in Hugging Face.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        t, k, p, m = self.temperature, self.top_k, self.top_p, self.min_p

        def number(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        if not number(t) or t < 0:
            raise ValueError(f"temperature={t!r}; valid: a finite number >= 0 (0 is greedy)")
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k={k!r}; valid: an int >= 0 (0 keeps every token)")
        if not number(p) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r}; valid: a number in (0, 1] (1 keeps every token)")
        if not number(m) or not 0 <= m < 1:
            raise ValueError(f"min_p={m!r}; valid: a number in [0, 1) (0 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_sort(self) -> bool:
        """top-k and top-p need the logits sorted; min-p and plain sampling do not."""
        return self.top_k > 0 or self.top_p < 1

    def arrays(self) -> tuple[Array, Array, Array, Array]:
        """The values as traced scalars, so changing them never recompiles."""
        return (
            jnp.float32(max(float(self.temperature), 1e-6)),  # greedy never divides by it
            jnp.int32(self.top_k),
            jnp.float32(self.top_p),
            jnp.float32(self.min_p),
        )


def sample_tokens(
    logits: Array,
    keys: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    min_p: Array,
    *,
    greedy: bool,
    needs_sort: bool,
) -> Array:
    """Chooses one token per row.

    Args:
      logits: float32 [B, V].
      keys: typed PRNG keys [B], one per row.
      temperature, top_k, top_p, min_p: scalars (see SamplingParams).
      greedy: static; argmax, ignoring everything else.
      needs_sort: static; whether top_k/top_p are active (they need a sort over V).

    Returns:
      int32 [B]
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / temperature
    neg_inf = jnp.float32(-jnp.inf)
    if needs_sort:
        v = x.shape[-1]
        ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), x.shape)
        # Descending by logit; a stable sort keeps the lower token id first among ties.
        neg_sorted, ids = jax.lax.sort((-x, ids), dimension=-1, num_keys=1, is_stable=True)
        x = -neg_sorted  # [B, V], x[:, 0] is the most likely token
        rank = jnp.arange(v)
        keep = (top_k <= 0) | (rank < top_k)
        probs = jax.nn.softmax(jnp.where(keep, x, neg_inf), axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the smallest set
        # reaching top_p. top_p == 1 keeps all (float cumsums can round to 1 early).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep &= (before < top_p) | (top_p >= 1)
    else:
        ids = None
        keep = jnp.ones(x.shape, bool)
    probs = jax.nn.softmax(jnp.where(keep, x, neg_inf), axis=-1)
    keep &= probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, x, neg_inf))
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def _step_keys(seed: Array, rows: Array, step: Array) -> Array:
    """[B] keys for `step`: depend on (seed, row, step) only."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)


# ----------------------------------------------------------------------------- decode layout
# Projection weights by leaf name: (letters of the model's layout, contracted letters). They
# must match the einsums in model.py (the cache-vs-recompute tests check the two agree).
_PROJECTIONS = {
    "wq": ("DNH", "D"),
    "wk": ("DKH", "D"),
    "wv": ("DKH", "D"),
    "wo": ("NHD", "NH"),
    "w_gate": ("DF", "D"),
    "w_up": ("DF", "D"),
    "w_down": ("FD", "F"),
    "lm_head": ("DV", "D"),
}


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
    return _PROJECTIONS.get(getattr(path[-1], "key", None))


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
    out_dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
    free_shape = [w.shape[rhs.index(c)] for c in free]
    chunks = _as_chunks(w, rhs, contract)  # [C, M, Kc]
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
    return y.astype(out_dtype).reshape(*lead, *free_shape)


_F32 = {"preferred_element_type": jnp.float32}


def _to_model_layout(params: Any, model_shapes: Any) -> Any:
    """Matvec-layout params -> the model's layout (lazy rearrangements inside jit)."""

    def f(path, a, shape):
        proj = _projection(path)
        return a if proj is None else _from_chunks(a, *proj, shape.shape)

    return jax.tree_util.tree_map_with_path(f, params, model_shapes)


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


def resolve_layout(layout: str, config: ModelConfig, mesh: Mesh) -> str:
    """ "auto" -> "matvec" for 16-bit weights on CPU (see matvec_dense), else "standard"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid: {LAYOUTS}")
    if layout != "auto":
        return layout
    cpu = mesh.devices.flat[0].platform == "cpu"
    return "matvec" if cpu and config.dtype in ("bfloat16", "float16") else "standard"


def prepare_decode_params(
    params: Any,
    config: ModelConfig,
    mesh: Mesh,
    *,
    layout: str = "auto",
    unroll: bool = True,
    dtype: str | None = None,
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
    layout = resolve_layout(layout, config, mesh)
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


# ----------------------------------------------------------------------------- buckets
def bucket(n: int, limit: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum), but at most `limit` (which must be >= n)."""
    return min(limit, max(minimum, 1 << max(0, n - 1).bit_length()))


def batch_bucket(n: int, multiple: int) -> int:
    """Rows a batch of n prompts is padded to: a power of two, and a multiple of the mesh's
    batch axes (data * fsdp) so the cache can be split over them."""
    b = 1 << max(0, n - 1).bit_length()
    return -(-b // multiple) * multiple


# ----------------------------------------------------------------------------- sampler
class Sampler:
    """Jitted prefill / decode over a KV cache for one model on one mesh.

    Attributes:
      config: the decode config (unrolled layers unless `unroll=False`).
      params: the decode params (see `prepare_decode_params`), sharded over `mesh`.
      layout: "standard" or "matvec".
      trace_counts: how often each jitted function was traced (= compiled); for tests.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        mesh: Mesh,
        *,
        layout: str = "auto",
        unroll: bool = True,
        dtype: str | None = None,
    ):
        """Prepares the decode params from `params` (left untouched) and the jitted functions.

        Args:
          config, params: the model.
          mesh: the (data, fsdp, tensor) mesh the params and caches live on.
          layout, unroll, dtype: see `prepare_decode_params`.
        """
        self.mesh = mesh
        self.params, self.config, self.layout = prepare_decode_params(
            params, config, mesh, layout=layout, unroll=unroll, dtype=dtype
        )
        self._model_shapes = jax.eval_shape(
            lambda k: nn.unbox(init_params(self.config, k)), jax.random.key(0)
        )
        dense = matvec_dense if self.layout == "matvec" else einsum_dense
        self._model = Transformer(self.config, dense)
        self.batch_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._prefill_jit = jax.jit(self._prefill_fn, static_argnames="cache_len")
        self._decode_jit = jax.jit(self._decode_fn, donate_argnames="cache")
        self._start_jit = jax.jit(
            self._start_fn, static_argnames=("cache_len", "greedy", "needs_sort")
        )
        # XLA hoists loop-invariant work out of the decode loop, including the bf16->f32
        # conversion of every weight: the loop would then read an f32 copy (twice the bytes, and
        # twice the memory, remade on every call). Keep the conversion inside the fused
        # matrix-vector products instead.
        options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
        self._run_jit = jax.jit(
            self._run_fn,
            static_argnames=("greedy", "needs_sort"),
            donate_argnames="state",
            compiler_options=options if self.layout == "matvec" else None,
        )
        self._score_jit = jax.jit(self._score_fn)

    # ------------------------------------------------------------------ contexts
    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            yield

    def cache_shardings(self) -> Any:
        """NamedShardings of the cache tree (kv heads over `tensor`, rows over data/fsdp)."""
        axes = cache_logical_axes(self.config)
        return jax.tree.map(
            lambda a: nn.logical_to_mesh_sharding(
                PartitionSpec(*a), self.mesh, sharding.LOGICAL_RULES
            ),
            axes,
            is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(x, str) for x in a),
        )

    def _new_cache(self, batch: int, cache_len: int) -> Any:
        cache = init_cache(self.config, batch, cache_len)
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings())

    def _apply(self, params, tokens, positions, cache, logits_at=None):
        if self.layout == "matvec":
            params = _to_model_layout(params, self._model_shapes)
        return self._model.apply(
            {"params": params}, tokens, positions, cache=cache, logits_at=logits_at
        )

    def _prefill_body(self, params, tokens, lengths, cache_len):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cache = self._new_cache(b, cache_len)
        logits, cache = self._apply(params, tokens, positions, cache, (lengths - 1)[:, None])
        return logits[:, 0], cache

    def _prefill_fn(self, params, tokens, lengths, *, cache_len):
        self.trace_counts["prefill"] += 1
        return self._prefill_body(params, tokens, lengths, cache_len)

    def _decode_fn(self, params, cache, tokens, positions):
        self.trace_counts["decode_step"] += 1
        logits, cache = self._apply(params, tokens[:, None], positions[:, None], cache)
        return logits[:, 0], jax.lax.with_sharding_constraint(cache, self.cache_shardings())

    def _start_fn(
        self,
        params,
        tokens,
        lengths,
        active,
        rows,
        seed,
        sp,
        stop_ids,
        *,
        cache_len,
        greedy,
        needs_sort,
    ):
        self.trace_counts["start"] += 1
        logits, cache = self._prefill_body(params, tokens, lengths, cache_len)
        keys = _step_keys(seed, rows, 0)
        tok = sample_tokens(logits, keys, *sp, greedy=greedy, needs_sort=needs_sort)
        out = jnp.zeros((tokens.shape[0], cache_len), jnp.int32).at[:, 0].set(tok)
        return {
            "cache": cache,
            "tokens": tok,
            "positions": lengths.astype(jnp.int32),  # where `tokens` is written next
            "done": ~active | _is_stop(tok, stop_ids),
            "out": out,  # [B, cache_len]: generated tokens, out[:, :count]
            "count": jnp.int32(1),
        }

    def _run_fn(
        self, params, state, until, stop_rows, rows, seed, sp, stop_ids, *, greedy, needs_sort
    ):
        self.trace_counts["run"] += 1
        state = dict(state, done=state["done"] | stop_rows)

        def cond(s):
            return (s["count"] < until) & ~jnp.all(s["done"])

        def body(s):
            logits, cache = self._apply(
                params, s["tokens"][:, None], s["positions"][:, None], s["cache"]
            )
            cache = jax.lax.with_sharding_constraint(cache, self.cache_shardings())
            tok = sample_tokens(
                logits[:, 0],
                _step_keys(seed, rows, s["count"]),
                *sp,
                greedy=greedy,
                needs_sort=needs_sort,
            )
            tok = jnp.where(s["done"], 0, tok)
            out = jax.lax.dynamic_update_slice(s["out"], tok[:, None], (0, s["count"]))
            return {
                "cache": cache,
                "tokens": tok,
                # A finished row stays put: its position never runs past the cache.
                "positions": jnp.where(s["done"], s["positions"], s["positions"] + 1),
                "done": s["done"] | _is_stop(tok, stop_ids),
                "out": out,
                "count": s["count"] + 1,
            }

        return jax.lax.while_loop(cond, body, state)

    def _score_fn(self, params, tokens, lengths):
        self.trace_counts["score"] += 1
        logits, _ = self._apply(params, tokens, None, None)  # [B, T, V] float32
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
        mask = jnp.arange(1, tokens.shape[1])[None, :] < lengths[:, None]
        return jnp.sum(jnp.where(mask, target, 0.0), axis=-1)

    # ------------------------------------------------------------------ low-level API
    def _put(self, x: np.ndarray) -> Array:
        """A [B, ...] host array placed with its rows over the mesh's batch axes."""
        return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

    def prefill(self, tokens: Any, lengths: Any, cache_len: int) -> tuple[Array, Any]:
        """Runs right-padded prompts into a new KV cache.

        Args:
          tokens: int [B, T], row b's prompt in tokens[b, :lengths[b]] (the rest is padding,
            written to the cache but never attended to).
          lengths: int [B], each in [1, T].
          cache_len: cache slots S >= T; row b can then decode positions lengths[b]..S-1.

        Returns:
          (float32 logits [B, V] at each row's last prompt token, cache)
        """
        tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
        b, t = tokens.shape
        if cache_len < t:
            raise ValueError(f"cache_len={cache_len} is shorter than the prompts ({t} tokens)")
        if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
            raise ValueError(f"lengths {lengths.tolist()} must be [B={b}] values in [1, {t}]")
        sharding.check_batch_fits_mesh(b, self.mesh)
        with self._context():
            return self._prefill_jit(
                self.params, self._put(tokens), self._put(lengths), cache_len=cache_len
            )

    def decode_step(self, cache: Any, tokens: Any, positions: Any) -> tuple[Array, Any]:
        """Feeds one token per row; the cache is donated (do not use the passed one again).

        Args:
          cache: from `prefill` or a previous `decode_step`.
          tokens: int [B], written at `positions`.
          positions: int [B], each row's next position (< cache length).

        Returns:
          (float32 logits [B, V] for the next token, updated cache)
        """
        tokens, positions = np.asarray(tokens, np.int32), np.asarray(positions, np.int32)
        with self._context():
            return self._decode_jit(self.params, cache, self._put(tokens), self._put(positions))

    # ------------------------------------------------------------------ generation
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        stop_ids: Iterable[int] = (),
        truncate: bool = False,
    ) -> list[list[int]]:
        """Continues each prompt; returns the new ids of each, without the stop id.

        Args:
          prompts: token id lists (of different lengths).
          max_new_tokens: at most this many new tokens per prompt.
          sampling: token choice (greedy by default).
          seed: PRNG seed; the same seed gives the same result.
          stop_ids: a row ends at the first of these it produces (not included in the result).
          truncate: drop the oldest prompt tokens of prompts that would not fit the context,
            instead of raising.

        Returns:
          One list of new ids per prompt.
        """
        gen = Generation(self, prompts, max_new_tokens, sampling, seed, stop_ids, truncate)
        gen.advance(max_new_tokens)
        return gen.tokens

    def score(
        self, prompts: Sequence[Sequence[int]], max_batch_bytes: int = 1 << 29
    ) -> list[float]:
        """Sum of log p(token_i | tokens_<i) over i >= 1 of each sequence (its first token is
        the context, e.g. BOS).

        Args:
          prompts: token id lists, each of 1..max_seq_len tokens.
          max_batch_bytes: rows per forward pass are limited so the float32 logits of a batch
            stay under this size.

        Returns:
          One float per sequence.
        """
        seqs = check_prompts(prompts, self.config, max_new_tokens=0)
        v, limit = self.config.vocab_size, self.config.max_seq_len
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together
        result = [0.0] * len(seqs)
        i = 0
        while i < len(order):
            # Grow the batch while its logits fit the budget (lengths only grow: sorted).
            chunk, t = [order[i]], bucket(len(seqs[order[i]]), limit)
            while i + len(chunk) < len(order):
                t_next = bucket(len(seqs[order[i + len(chunk)]]), limit)
                if (len(chunk) + 1) * t_next * v * 4 > max_batch_bytes:
                    break
                chunk.append(order[i + len(chunk)])
                t = t_next
            b = batch_bucket(len(chunk), self.batch_multiple)
            tokens = np.zeros((b, t), np.int32)
            lengths = np.ones((b,), np.int32)
            for r, j in enumerate(chunk):
                tokens[r, : len(seqs[j])] = seqs[j]
                lengths[r] = len(seqs[j])
            with self._context():
                out = self._score_jit(self.params, self._put(tokens), self._put(lengths))
            out = np.asarray(out)
            for r, j in enumerate(chunk):
                result[j] = float(out[r])
            i += len(chunk)
        return result


def _is_stop(tokens: Array, stop_ids: Array) -> Array:
    """bool [B]: tokens [B] is one of stop_ids [n] (padded with -1)."""
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


# ----------------------------------------------------------------------------- validation
def check_prompts(
    prompts: Sequence[Sequence[int]],
    config: ModelConfig,
    max_new_tokens: int,
    truncate: bool = False,
) -> list[list[int]]:
    """Validates token prompts (and max_new_tokens) against the model; returns them as lists.

    Raises:
      ValueError: naming the bad value and what would be valid.
    """
    limit = config.max_seq_len
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; valid: an int in [1, {limit - 1}]")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass a non-empty list of prompts")
    if max_new_tokens != 0 and not 1 <= max_new_tokens < limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}; valid: 1 to {limit - 1} (the model's context, "
            f"max_seq_len={limit}, must also hold the prompt)"
        )
    room = limit - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ValueError(f"prompt {i} is a {type(p).__name__}; token prompts are id lists")
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token (e.g. BOS)")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token id {bad[0]}, outside the vocabulary [0, {config.vocab_size})"
            )
        if len(ids) > room:
            if not truncate:
                need = f" + max_new_tokens={max_new_tokens}" if max_new_tokens else ""
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens{need}, more than the model's context "
                    f"(max_seq_len={limit}); shorten it"
                    + (", lower max_new_tokens" if max_new_tokens else "")
                    + f" or pass truncate=True to keep its last {room} tokens"
                )
            ids = ids[len(ids) - room :]
        out.append(ids)
    return out


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}; valid: an int in [0, 2**32)")
    return int(seed)


# ----------------------------------------------------------------------------- generation
class Generation:
    """A batch of prompts being continued on device, advanced from the host.

    Attributes:
      tokens: each prompt's new tokens so far (stop ids excluded).
      finished: per prompt, whether it has stopped (stop id, `stop()` or max_new_tokens).
    """

    def __init__(
        self,
        sampler: Sampler,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        stop_ids: Iterable[int] = (),
        truncate: bool = False,
    ):
        """Validates the request and runs the prefill (which also picks the first token)."""
        config = sampler.config
        prompts = check_prompts(prompts, config, max_new_tokens, truncate)
        if max_new_tokens == 0:
            raise ValueError(f"max_new_tokens=0; valid: 1 to {config.max_seq_len - 1}")
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        seed = _check_seed(seed)
        stops = sorted({int(s) for s in stop_ids})
        bad = [s for s in stops if not 0 <= s < config.vocab_size]
        if bad:
            raise ValueError(f"stop id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
        self._sampler = sampler
        self.max_new_tokens = int(max_new_tokens)
        self._stop_set = frozenset(stops)
        n = len(prompts)
        limit = config.max_seq_len
        b = batch_bucket(n, sampler.batch_multiple)
        t = bucket(max(len(p) for p in prompts), limit)
        cache_len = bucket(t + max_new_tokens, limit)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        n_slots = -(-max(1, len(stops)) // STOP_ID_SLOTS) * STOP_ID_SLOTS
        stop_arr = np.full((n_slots,), -1, np.int32)
        stop_arr[: len(stops)] = stops
        self._static = {"greedy": sampling.greedy, "needs_sort": sampling.needs_sort}
        with sampler._context():
            self._args = (
                sampler._put(np.arange(b, dtype=np.int32)),
                jnp.uint32(seed),
                sampling.arrays(),
                jnp.asarray(stop_arr),
            )
            self._state = sampler._start_jit(
                sampler.params,
                sampler._put(tokens),
                sampler._put(lengths),
                sampler._put(np.arange(b) < n),
                *self._args,
                cache_len=cache_len,
                **self._static,
            )
        self._n = n
        self._batch = b
        self._count = 1
        self._read = 0
        self._stop_rows = np.zeros((b,), bool)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.finished = [False] * n
        self._collect()

    @property
    def done(self) -> bool:
        """Every prompt has finished."""
        return all(self.finished)

    def stop(self, rows: Iterable[int]) -> None:
        """Ends these prompts now (e.g. a stop string appeared); their tokens stay as they are."""
        for r in rows:
            self.finished[r] = True
            self._stop_rows[r] = True

    def advance(self, n_steps: int) -> list[list[int]]:
        """Runs up to n_steps decode steps on device (fewer once every row has stopped).

        Returns:
          The new tokens of each prompt since the previous call.
        """
        before = [len(t) for t in self.tokens]
        if n_steps > 0 and not self.done:
            s = self._sampler
            until = min(self._count + n_steps, self.max_new_tokens)
            with s._context():
                self._state = s._run_jit(
                    s.params,
                    self._state,
                    jnp.int32(until),
                    s._put(self._stop_rows.copy()),
                    *self._args,
                    **self._static,
                )
            self._count = int(self._state["count"])
            self._collect()
        return [t[k:] for t, k in zip(self.tokens, before)]

    def _collect(self) -> None:
        out = np.asarray(self._state["out"])  # [B, S]: one small transfer, no per-slice compile
        for r in range(self._n):
            if self.finished[r]:
                continue
            for tok in out[r, self._read : self._count].tolist():
                if tok in self._stop_set:
                    self.finished[r] = True
                    break
                self.tokens[r].append(tok)
            if len(self.tokens[r]) >= self.max_new_tokens:
                self.finished[r] = True
        self._read = self._count
        if self._count >= self.max_new_tokens:
            self.finished = [True] * self._n


# ----------------------------------------------------------------------------- text
class TextStream:
    """Token ids in, text pieces out: never splits a UTF-8 character, and ends the text before
    the first stop string (holding back any tail that may still grow into one).

    `push(ids)` returns the text that is now certain; `finish()` returns the rest. Their
    concatenation equals `tokenizer.decode(ids)` cut before the first stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """Adds generated ids; returns the text that can be shown now (maybe "").

        Args:
          ids: the next token ids.
          final: no more ids follow: flush an incomplete character (as U+FFFD) and the
            held-back tail.
        """
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._tokenizer.decode_bytes(list(ids)), final)
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            piece, self._pending = self._pending[:cut], ""
            return piece
        hold = 0 if final else _stop_prefix_len(self._pending, self._stop)
        piece = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(piece) :]
        return piece

    def finish(self) -> str:
        """Returns the rest of the text once generation has ended."""
        return self.push((), final=True)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalises `stop` (None, a string or a list of strings) to a tuple of strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strs, got {s!r}")
    return stop


def generate_text(
    sampler: Sampler,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_ids: Iterable[int] = (),
    truncate: bool = False,
    chunk: int = 16,
) -> list[str]:
    """Continues token prompts and returns the new text of each, ended before a stop string.

    Without stop strings the whole generation is one device loop; with them, the host looks
    at the text every `chunk` steps and stops the rows that produced one.
    """
    gen = Generation(sampler, prompts, max_new_tokens, sampling, seed, stop_ids, truncate)
    streams = [TextStream(tokenizer, stop) for _ in gen.tokens]
    pieces: list[list[str]] = [[] for _ in gen.tokens]
    new = [list(t) for t in gen.tokens]
    while True:
        for r, ids in enumerate(new):
            if ids and not streams[r].stopped:
                pieces[r].append(streams[r].push(ids))
                if streams[r].stopped:
                    gen.stop([r])
        if gen.done:
            break
        new = gen.advance(chunk if stop else max_new_tokens)
    return ["".join(p) + s.finish() for p, s in zip(pieces, streams)]


def stream_text(
    sampler: Sampler,
    tokenizer: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_ids: Iterable[int] = (),
    truncate: bool = False,
) -> Iterator[str]:
    """Yields the continuation of one token prompt as text pieces, one decode step at a time.

    The pieces concatenate to `generate_text`'s result for the same arguments.
    """
    gen = Generation(sampler, [prompt], max_new_tokens, sampling, seed, stop_ids, truncate)
    stream = TextStream(tokenizer, stop)
    new = list(gen.tokens[0])
    while True:
        if new:
            piece = stream.push(new)
            if piece:
                yield piece
            if stream.stopped:
                return
        if gen.done:
            break
        new = gen.advance(1)[0]
    rest = stream.finish()
    if rest:
        yield rest


def run_chat(
    model: Any,
    lines: Iterable[str],
    write: Callable[[str], Any],
    system: str | None = None,
    prompt: str = "",
    **kwargs: Any,
) -> list[Mapping[str, str]]:
    """An interactive chat: each line is a user turn; the reply is streamed to `write`.

    `/reset` forgets the conversation (keeping the system prompt), `/exit` ends it, as does
    the end of `lines`.

    Args:
      model: a `Llama3` (its tokenizer must have the Llama 3 chat tokens).
      lines: user input, one turn per line (e.g. sys.stdin).
      write: where output goes (e.g. sys.stdout.write); flushed by the caller's stream.
      system: an optional system prompt.
      prompt: written before reading each line (e.g. "> " on a terminal).
      **kwargs: generation arguments for `model.stream`.

    Returns:
      The conversation when the chat ended.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    flush = getattr(write, "__self__", None)
    write(prompt)
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            write("[conversation reset]\n")
        elif command:
            messages.append({"role": "user", "content": text})
            reply = []
            try:
                ids = model.tokenizer.encode_dialog(messages)
                for piece in model.stream(ids, **kwargs):
                    reply.append(piece)
                    write(piece)
                    if hasattr(flush, "flush"):
                        flush.flush()
            except ValueError as e:
                messages.pop()
                write(f"[error: {e}]")
            else:
                messages.append({"role": "assistant", "content": "".join(reply)})
            write("\n")
        write(prompt)
    return messages
