"""Text generation: jitted prefill and decode over a KV cache, token sampling, stop handling.

Bottom up:
  (sampling_params.py)   SamplingParams (temperature / top-k / top-p / min-p, validated),
                         sample_tokens (the per-row draw) and the bucket sizes.
  (decode_layout.py)     the params laid out for decoding: layers unrolled and, on CPU with
                         16-bit weights, projections as matrix-vector-friendly chunks.
  Sampler                owns the decode params and the jitted functions: `prefill`,
                         `decode_step` (donates the cache), and the generation loop: `_start`
                         (prefill + first token) and `_run` (a `lax.while_loop` that exits
                         once every row has stopped; each iteration makes `decode_chunk`
                         steps in a fixed-trip `lax.scan`). Batch and cache lengths
                         are bucketed to powers of two, prompts to 2^k or 3 * 2^(k-1), so new
                         prompt lengths reuse compiled code and a generation never compiles
                         per token.
  Generation             one batch of prompts being generated, advanced from the host in
                         chunks (one chunk unless stop strings or streaming need a look).
  (text_stream.py)       text on top: streaming detokenisation, stop strings, chat.

Randomness: row r's token at step s is drawn with fold_in(fold_in(key(seed), r), s), so a result
depends on the seed, the row and the step only, not on bucketing, chunking or streaming.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from llama_jax.inference.decode_layout import (  # noqa: F401  (TIED_HEAD re-exported)
    TIED_HEAD,
    _to_model_layout,
    decode_compiler_options,
    matvec_dense,
    prepare_decode_params,
    quantize_decode_params,
    tied_head,
)
from llama_jax.inference.sampling_params import (  # noqa: F401  (re-exported: sampling.X keeps working)
    MIN_BUCKET,
    SamplingParams,
    _check_seed,
    _step_keys,
    batch_bucket,
    bucket,
    check_prompts,
    length_bucket,
    sample_tokens,
)
from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig
from llama_jax.model.quantize import as_qweights, check_quantize, int8_dense
from llama_jax.model.transformer import (
    Transformer,
    cache_logical_axes,
    einsum_dense,
    init_cache,
    init_params,
)

Array = jax.Array

STOP_ID_SLOTS = 8  # stop ids are padded to a multiple of this, so their count rarely recompiles
# Decode steps per iteration of the generation loop, by platform (see `Sampler`): on a GPU every
# while-loop iteration pays a fixed cost (its predicate copied to the host, the body's kernels
# launched one by one) that a fixed-trip inner scan of k steps pays once per k tokens; on CPU
# an iteration costs next to nothing (bench/RESULTS.md, "decode_chunk").
DECODE_CHUNK = {"cpu": 1, "gpu": 8, "tpu": 8}
DEFAULT_DECODE_CHUNK = 8  # other platforms


# ----------------------------------------------------------------------------- sampler
class Sampler:
    """Jitted prefill / decode over a KV cache for one model on one mesh.

    Attributes:
      config: the decode config (unrolled layers unless `unroll=False`).
      params: the decode params (see `prepare_decode_params`), sharded over `mesh`.
      layout: "standard" or "matvec".
      decode_chunk: decode steps per iteration of the generation loop (may be changed between
        calls: each value compiles its own loop).
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
        quantize: str | None = None,
        vocab_limit: int | None = None,
        decode_chunk: int | None = None,
    ):
        """Prepares the decode params from `params` (left untouched) and the jitted functions.

        Args:
          config, params: the model.
          mesh: the (data, fsdp, tensor) mesh the params and caches live on.
          layout, unroll, dtype: see `prepare_decode_params`.
          quantize: "int8" stores the projection weights as int8 with per-channel scales
            (quantize.py; in either layout: "auto" picks matvec on CPU, where the int8 -> f32
            conversion then fuses into the matrix-vector products), None keeps them.
          vocab_limit: ids >= this (a model vocabulary larger than its tokenizer's, e.g. a
            tokenizer trained smaller than asked) get probability 0, so nothing is sampled that
            the tokenizer cannot decode; None: every id of the model.
          decode_chunk: decode steps per iteration of the on-device generation loop (a
            fixed-trip `lax.scan` inside the `while_loop`); tokens do not depend on it, only
            the loop's fixed cost per token and the steps wasted past the end (< k per
            `Generation.advance`). None: DECODE_CHUNK for the mesh's platform.
        """
        platform = mesh.devices.flat[0].platform
        if decode_chunk is None:
            decode_chunk = DECODE_CHUNK.get(platform, DEFAULT_DECODE_CHUNK)
        if (
            isinstance(decode_chunk, bool)
            or not isinstance(decode_chunk, (int, np.integer))
            or (not 1 <= decode_chunk <= 256)
        ):
            raise ValueError(f"decode_chunk={decode_chunk!r}; valid: an int in [1, 256]")
        self.decode_chunk = int(decode_chunk)
        self.mesh = mesh
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < config.vocab_size else None
        self.quantize = check_quantize(quantize)
        self.params, self.config, self.layout = prepare_decode_params(
            params,
            config,
            mesh,
            layout=layout,
            unroll=unroll,
            dtype=dtype,
            quantized=bool(self.quantize),
        )
        if self.quantize:  # a tied embedding also gets an int8 copy for the head
            with jax.set_mesh(mesh):
                self.params = jax.jit(quantize_decode_params, static_argnums=(1, 2))(
                    self.params, self.layout, self.config.tie_embeddings
                )
        self._model_shapes = jax.eval_shape(
            lambda k: nn.unbox(init_params(self.config, k)), jax.random.key(0)
        )
        if self.layout == "matvec":
            dense = matvec_dense  # int8 QWeights too
        else:
            dense = int8_dense if self.quantize else einsum_dense
        self._dense = dense
        self._model = Transformer(self.config, dense)
        self.batch_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self.trace_counts: collections.Counter[str] = collections.Counter()
        # Options for every jit that runs decode steps (see decode_compiler_options).
        self.compiler_options = decode_compiler_options(self.config, mesh, bool(self.quantize))
        step_options = self.compiler_options or None
        self._prefill_jit = jax.jit(self._prefill_fn, static_argnames="cache_len")
        self._decode_jit = jax.jit(
            self._decode_fn, donate_argnames="cache", compiler_options=step_options
        )
        self._start_jit = jax.jit(
            self._start_fn, static_argnames=("cache_len", "greedy", "needs_sort")
        )
        # XLA hoists loop-invariant work out of the decode loop, including the bf16->f32
        # conversion of every weight: the loop would then read an f32 copy (twice the bytes, and
        # twice the memory, remade on every call). Keep the conversion inside the fused
        # matrix-vector products instead.
        run_options = dict(self.compiler_options)
        if self.layout == "matvec":
            run_options["xla_disable_hlo_passes"] = "while-loop-invariant-code-motion"
        self._run_jit = jax.jit(
            self._run_fn,
            static_argnames=("greedy", "needs_sort", "chunk"),
            donate_argnames="state",
            compiler_options=run_options or None,
        )

    # ------------------------------------------------------------------ contexts
    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules every call of this sampler's functions runs under."""
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

    def new_cache(self, batch: int, cache_len: int) -> Any:
        """A zeroed KV cache of `batch` rows and `cache_len` slots, sharded for this mesh."""
        cache = init_cache(self.config, batch, cache_len)
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings())

    def apply(self, params, tokens, positions, cache, logits_at=None):
        """One model call on the decode-laid-out params (what prefill, the decode steps and
        the serving engine run): (float32 logits, updated cache); traceable inside jit."""
        params = dict(params)
        head = params.pop(TIED_HEAD, None)  # int8 copy of a tied embedding (quantized)
        if self.quantize:
            params = as_qweights(params)
        if self.layout == "matvec":
            params = _to_model_layout(params, self._model_shapes)
        out, cache = self._model.apply(
            {"params": params},
            tokens,
            positions,
            cache=cache,
            logits_at=logits_at,
            return_hidden=head is not None,
        )
        logits = out
        if head is not None:
            shape = self._model_shapes["embedding"].shape
            w = tied_head(head, self.layout, shape, self.config.dtype)
            logits = self._dense("BTD,VD->BTV", out, w, preferred_element_type=jnp.float32)
        if self.vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)
        return logits, cache

    def _prefill_body(self, params, tokens, lengths, cache_len):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cache = self.new_cache(b, cache_len)
        logits, cache = self.apply(params, tokens, positions, cache, (lengths - 1)[:, None])
        return logits[:, 0], cache

    def _prefill_fn(self, params, tokens, lengths, *, cache_len):
        self.trace_counts["prefill"] += 1
        return self._prefill_body(params, tokens, lengths, cache_len)

    def _decode_fn(self, params, cache, tokens, positions):
        self.trace_counts["decode_step"] += 1
        logits, cache = self.apply(params, tokens[:, None], positions[:, None], cache)
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
        self,
        params,
        state,
        until,
        stop_rows,
        rows,
        seed,
        sp,
        stop_ids,
        *,
        greedy,
        needs_sort,
        chunk,
    ):
        self.trace_counts["run"] += 1
        state = dict(state, done=state["done"] | stop_rows)

        def cond(s):
            return (s["count"] < until) & ~jnp.all(s["done"])

        def step(s):
            # A step past the budget, or after every row has stopped, changes nothing but the
            # cache, where it writes what the next real step writes again (same token, same
            # position): so k steps per iteration give the tokens of k = 1, only the last
            # iteration's leftover steps are wasted.
            live = cond(s)
            logits, cache = self.apply(
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
            # count < out's width whenever live (count < until <= max_new_tokens < cache_len).
            col = jnp.minimum(s["count"], s["out"].shape[1] - 1)
            kept = jax.lax.dynamic_slice_in_dim(s["out"], col, 1, axis=1)[:, 0]
            out = jax.lax.dynamic_update_slice(
                s["out"], jnp.where(live, tok, kept)[:, None], (0, col)
            )
            return {
                "cache": cache,
                "tokens": jnp.where(live, tok, s["tokens"]),
                # A finished row stays put: its position never runs past the cache.
                "positions": jnp.where(live & ~s["done"], s["positions"] + 1, s["positions"]),
                "done": jnp.where(live, s["done"] | _is_stop(tok, stop_ids), s["done"]),
                "out": out,
                "count": s["count"] + live.astype(jnp.int32),
            }

        def body(s):
            if chunk == 1:
                return step(s)
            # A fixed trip count: no per-token loop predicate goes back to the host.
            return jax.lax.scan(lambda c, _: (step(c), None), s, None, length=chunk)[0]

        return jax.lax.while_loop(cond, body, state)

    # ------------------------------------------------------------------ low-level API
    def put(self, x: np.ndarray) -> Array:
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
        with self.context():
            return self._prefill_jit(
                self.params, self.put(tokens), self.put(lengths), cache_len=cache_len
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
        with self.context():
            return self._decode_jit(self.params, cache, self.put(tokens), self.put(positions))

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


def _is_stop(tokens: Array, stop_ids: Array) -> Array:
    """bool [B]: tokens [B] is one of stop_ids [n] (padded with -1)."""
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


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
        t = length_bucket(max(len(p) for p in prompts), limit)
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
        with sampler.context():
            self._args = (
                sampler.put(np.arange(b, dtype=np.int32)),
                jnp.uint32(seed),
                sampling.arrays(),
                jnp.asarray(stop_arr),
            )
            self._state = sampler._start_jit(
                sampler.params,
                sampler.put(tokens),
                sampler.put(lengths),
                sampler.put(np.arange(b) < n),
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

        The device loop runs whole iterations of `decode_chunk` steps; steps past n_steps
        change nothing (so any n_steps gives the same tokens), but cost time: pass multiples
        of `decode_chunk` where it matters.

        Returns:
          The new tokens of each prompt since the previous call.
        """
        before = [len(t) for t in self.tokens]
        if n_steps > 0 and not self.done:
            s = self._sampler
            until = min(self._count + n_steps, self.max_new_tokens)
            with s.context():
                self._state = s._run_jit(
                    s.params,
                    self._state,
                    jnp.int32(until),
                    s.put(self._stop_rows.copy()),
                    *self._args,
                    **self._static,
                    chunk=s.decode_chunk,
                )
            self._count = int(self._state["count"])
            self._collect()
        return [t[k:] for t, k in zip(self.tokens, before)]

    def _collect(self) -> None:
        # [B, S]: one small transfer, no per-slice compile; under several processes every
        # process gets every row (all of them drive the same host loop).
        out = sharding.to_host(self._state["out"])
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
