"""The engine's device side: one KV cache of `size` slots and every slot's decode state,
advanced by jitted calls that never wait for the host.

Each slot's state lives on device as [size] arrays (next input token, position, tokens made,
budget, seed, choice index, sampling settings, stop ids [size, STOP_SLOTS], active), so one
decode step of all slots is one call whose inputs are its own previous outputs: the host can
queue step k+1 before it has read step k's tokens, and reads one [size, 2] int32 array a step.

The slot count follows the load: `size` is one of a few buckets (`slot_buckets`: 1, 2, 4, ...
up to max_batch, times the mesh's batch axes), each compiled once, and the engine `resize`s
between them as choices come and go, so one client's step is a batch-1 step.

  step     all slots, `chunk` steps (a fixed-trip scan, as in Sampler): one token
           each a step (each row its own sampling settings and key), stop ids and exhausted
           budgets detected on device. Returns (token, status) per row:
           IDLE, TOKEN, LAST (the token ends the choice: length) or STOP (a stop id, not
           emitted). `chunk` is the decode_chunk, except at the smallest size of several,
           where `warmup` may raise it to LONE_CHUNK (see there). There a call may also
           attend a prefix `span` of the cache (the smallest of SPANS that holds every
           position its choices can reach), as `generate` sizes its cache to the request.
  admit    b new prompts at once: prefill [b, t] (rows and length bucketed, whatever `size`)
           into a fresh cache, picking each row's first token from the prefill's logits (as
           `Llama3.generate` does, so a request costs no decode step for it), then scatter
           the cache into their slots and write their state rows (`insert`, compiled per
           size). Returns the first tokens' (token, status) as a step does. Rows padded to
           the bucket carry slot index max_batch: idle, and dropped by the scatters.
  resize   a new cache and state of another bucket's size holding the given slots' rows, in
           the given order (the engine keeps the choices in use at the front).
  release  deactivates slots (cancelled on the host).

Randomness: choice c draws its token at step s with fold_in(fold_in(key(seed), c), s), as row c
of `Llama3.generate` does offline, so output depends neither on the slot nor on the size.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.inference.sampler import Sampler, sample_tokens
from llama_jax.model import sharding
from llama_jax.model.transformer import cache_logical_axes
from llama_jax.serve.requests import STOP_SLOTS, TOP_LOGPROBS

IDLE, TOKEN, LAST, STOP = 0, 1, 2, 3  # per-row status of a step
# Columns of the int32 rows `admit` takes (then the stop ids); flags: 1 greedy, 2 logprobs.
# Its float rows: temperature, top_p, min_p.
INT_COLUMNS = ("slot", "tokens", "positions", "max_tokens", "seeds", "choice", "top_k", "flags")
# The smallest size's steps per call when its step is cheap (the engine's lightest load: one
# client). A call's fixed cost on the host (dispatch, the read, the hand-over of its events,
# ~0.5-1 ms on a CPU) is then a large share of a step of a small model, which `generate`'s
# on-device loop does not pay; k steps a call pay it once. The price: a request that arrives
# meanwhile waits for the call in flight, so k is at most LONE_CHUNK and a call at most
# ~LONE_CALL_S (bench/RESULTS.md, "one client": the demo model's step, ~2 ms, gets 8; a 50M's,
# ~7-10 ms, 3-4; a step over LONE_CALL_S / 2, decode_chunk).
LONE_CHUNK, LONE_CALL_S = 8, 0.04
# Cache prefixes a lone-chunk call may attend (below max_seq_len; the full cache otherwise). A
# call slices the prefix once, makes its k steps on it and writes it back once: with k > 1 that
# reads less than k steps over the whole cache when the request is short (the README demo's
# step: 3.8 ms over 512 positions, 2.6 ms over 256).
SPANS = tuple(64 * 2**i for i in range(16))


def _state_zeros(b: int) -> dict:
    return {
        "tokens": jnp.zeros((b,), jnp.int32),  # next input token
        "positions": jnp.zeros((b,), jnp.int32),  # where it is written
        "steps": jnp.zeros((b,), jnp.int32),  # tokens made so far (the key's step)
        "max_tokens": jnp.zeros((b,), jnp.int32),
        "seeds": jnp.zeros((b,), jnp.uint32),
        "choice": jnp.zeros((b,), jnp.int32),
        "temp": jnp.ones((b,), jnp.float32),
        "top_k": jnp.zeros((b,), jnp.int32),
        "top_p": jnp.ones((b,), jnp.float32),
        "min_p": jnp.zeros((b,), jnp.float32),
        "greedy": jnp.ones((b,), bool),  # an idle slot never needs the sampling paths
        "want_lp": jnp.zeros((b,), bool),
        "active": jnp.zeros((b,), bool),
        "stops": jnp.full((b, STOP_SLOTS), -1, jnp.int32),
    }


def slot_buckets(max_batch: int, multiple: int) -> tuple[int, ...]:
    """The slot counts a step is compiled for: multiple * 2^i below max_batch, and max_batch
    (a multiple of `multiple`, the mesh's data * fsdp)."""
    out, b = [], multiple
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


class Slots:
    """The KV cache and slot state on the sampler's mesh, and the jitted calls on them.

    Attributes:
      size: slots on device now (one of `sizes`); slot indices are 0..size-1.
      sizes: the buckets `size` takes (ascending, the last is max_batch).
      steps_by_size: `step` calls per size so far (the record of what ran, for tests and
        benchmarks).
      trace_counts: how often each jitted function was traced (= compiled).
    """

    def __init__(
        self,
        sampler: Sampler,
        max_batch: int,
        max_seq_len: int,
        decode_chunk: int | None = None,
        sizes: Sequence[int] | None = None,
    ):
        """Args: the sampler (model, mesh), slots, positions per slot, decode steps per
        `step` call (None: the sampler's decode_chunk), and the sizes (None: `slot_buckets`;
        the engine checks a given list)."""
        self.sampler = s = sampler
        self.decode_chunk = int(decode_chunk or sampler.decode_chunk)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.sizes = tuple(sizes or slot_buckets(max_batch, sampler.batch_multiple))
        self.size = self.sizes[0]
        self.chunks = dict.fromkeys(self.sizes, self.decode_chunk)  # steps per call, by size
        self.spans: dict[int, tuple[int, ...]] = {}  # cache prefixes compiled, by size
        self.steps_by_size: collections.Counter[int] = collections.Counter()
        self.calls_by_span: collections.Counter[int] = collections.Counter()  # positions read
        self.trace_counts: collections.Counter[str] = collections.Counter()
        axes = cache_logical_axes(sampler.config)
        is_axes = lambda a: isinstance(a, tuple) and all(isinstance(x, str) for x in a)  # noqa: E731
        self._batch_axis = jax.tree.map(lambda a: a.index("batch"), axes, is_leaf=is_axes)
        self._length_axis = jax.tree.map(lambda a: a.index("cache_length"), axes, is_leaf=is_axes)
        cache_sh = s.cache_shardings()
        state_sh = jax.tree.map(
            lambda a: sharding.batch_sharding(s.mesh, a.ndim),
            jax.eval_shape(lambda: _state_zeros(max_batch)),
        )
        # Explicit out_shardings: the state and cache fed back keep one sharding, so no call
        # sees a new input sharding (a recompile) after the first.
        self._step_jit = jax.jit(
            self._step_fn,
            static_argnames=("k", "span"),
            donate_argnums=(1, 2),
            out_shardings=(cache_sh, state_sh, None, None),
            compiler_options=s.compiler_options or None,  # the sampler's decode options
        )
        self._prefill_jit = jax.jit(self._prefill_fn)
        self._insert_jit = jax.jit(
            self._insert_fn, donate_argnums=(0, 1), out_shardings=(cache_sh, state_sh)
        )
        # Not donated: a cache of another size cannot reuse the old buffer (it is freed as
        # soon as the call returns; a resize holds both for its duration).
        self._resize_jit = jax.jit(
            self._resize_fn, static_argnames="size", out_shardings=(cache_sh, state_sh)
        )
        self._release_jit = jax.jit(self._release_fn, donate_argnums=(0,), out_shardings=state_sh)
        self._new_jit = jax.jit(
            lambda size: (s.new_cache(size, max_seq_len), _state_zeros(size)),
            static_argnums=0,
            out_shardings=(cache_sh, state_sh),
        )
        self.reset()

    def reset(self) -> None:
        """A zeroed cache and all slots idle, at the smallest size (at start, and after a
        failed call)."""
        self.size = self.sizes[0]
        with self.sampler.context():
            self.cache, self.state = self._new_jit(self.size)

    # ------------------------------------------------------------------ jitted functions
    @property
    def chunk(self) -> int:
        """Decode steps a `step` call makes at the current size."""
        return self.chunks[self.size]

    def _step_fn(self, params, cache, state, k, span):
        """k steps of every slot in a fixed-trip scan (on the cache's first `span` positions,
        when given); outputs stacked [k, ...]."""
        self.trace_counts["step"] += 1
        full = cache
        if span is not None:
            cache = jax.tree.map(
                lambda c, ax: jax.lax.slice_in_dim(c, 0, span, axis=ax), cache, self._length_axis
            )

        def one(carry, _):
            cache, state, out, lp = self._one_step(params, *carry)
            return (cache, state), (out, lp)

        (cache, state), (out, lp) = jax.lax.scan(one, (cache, state), None, length=k)
        if span is not None:
            cache = jax.tree.map(
                lambda f, c, ax: jax.lax.dynamic_update_slice_in_dim(f, c, 0, axis=ax),
                full,
                cache,
                self._length_axis,
            )
        return cache, state, out, lp

    def _one_step(self, params, cache, state):
        s, st = self.sampler, state
        logits, cache = s.apply(params, st["tokens"][:, None], st["positions"][:, None], cache)
        cache = jax.lax.with_sharding_constraint(cache, s.cache_shardings())
        return (cache, *self._choose(logits[:, 0], st))

    def _choose(self, logits, st):
        """Each row's token from its logits [B, V] at position st["positions"]: (the state
        after it, (token, status) [B, 2], logprob arrays (zeros unless a row wants them))."""
        keys = jax.vmap(
            lambda sd, c, k: jax.random.fold_in(jax.random.fold_in(jax.random.key(sd), c), k)
        )(st["seeds"], st["choice"], st["steps"])
        row_sp = tuple(st[k][:, None] for k in ("temp", "top_k", "top_p", "min_p"))
        sampled = st["active"] & ~st["greedy"]
        sort = (st["top_k"] > 0) | (st["top_p"] < 1)
        zeros = jnp.zeros(st["tokens"].shape, jnp.int32)

        def draw(needs_sort):
            return lambda: sample_tokens(logits, keys, *row_sp, greedy=False, needs_sort=needs_sort)

        # Each row takes the path `Llama3.generate` would take for its settings (a sort only
        # where top-k / top-p are on); a path no row needs is skipped.
        plain = jax.lax.cond(jnp.any(sampled & ~sort), draw(False), lambda: zeros)
        ranked = jax.lax.cond(jnp.any(sampled & sort), draw(True), lambda: zeros)
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(st["greedy"], best, jnp.where(sort, ranked, plain))

        active = st["active"]
        is_stop = jnp.any(tok[:, None] == st["stops"], axis=-1)
        steps = st["steps"] + 1
        last = steps >= st["max_tokens"]
        status = jnp.where(
            ~active, IDLE, jnp.where(is_stop, STOP, jnp.where(last, LAST, TOKEN))
        ).astype(jnp.int32)
        going = status == TOKEN
        state = dict(
            st,
            tokens=jnp.where(going, tok, st["tokens"]),
            # A finished row stays put: its position never runs past the cache.
            positions=jnp.where(going, st["positions"] + 1, st["positions"]),
            steps=jnp.where(active, steps, st["steps"]),
            active=going,
            greedy=st["greedy"] | ~going,
            want_lp=st["want_lp"] & going,
        )

        def logprobs():
            logp = jax.nn.log_softmax(logits, axis=-1)
            top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
            return jnp.take_along_axis(logp, tok[:, None], -1)[:, 0], top_ids, top_lp

        b = tok.shape[0]
        none = (
            jnp.zeros((b,), jnp.float32),
            jnp.zeros((b, TOP_LOGPROBS), jnp.int32),
            jnp.zeros((b, TOP_LOGPROBS), jnp.float32),
        )
        lp = jax.lax.cond(jnp.any(st["want_lp"] & active), logprobs, lambda: none)
        return state, jnp.stack([tok, status], axis=1), lp

    def _prefill_fn(self, params, tokens, ints, floats):
        """Prefills tokens [b, t] (each row a whole prompt, right-padded) and picks each
        row's first token from the logits at its last prompt token, as `Llama3.generate` does:
        (their cache [b, ..., t, ...], their state rows after that token, (token, status)
        [b, 2], logprob arrays)."""
        self.trace_counts["prefill"] += 1
        s = self.sampler
        b, t = tokens.shape
        rows = {name: ints[:, i] for i, name in enumerate(INT_COLUMNS)}
        flags = rows.pop("flags")
        rows.update(
            seeds=jax.lax.bitcast_convert_type(rows["seeds"], jnp.uint32),
            greedy=(flags & 1) != 0,
            want_lp=(flags & 2) != 0,
            steps=jnp.zeros((b,), jnp.int32),
            # Padding rows (slot past every size) are idle: no sampling path runs for them.
            active=rows["slot"] < self.max_batch,
            temp=floats[:, 0],
            top_p=floats[:, 1],
            min_p=floats[:, 2],
            stops=ints[:, len(INT_COLUMNS) :],
        )
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Logits at the last prompt token only (rows["positions"] = prompt length - 1).
        logits, new = s.apply(
            params, tokens, positions, s.new_cache(b, t), rows["positions"][:, None]
        )
        rows, out, lp = self._choose(logits[:, 0], rows)
        return new, rows, out, lp

    def _insert_fn(self, cache, state, new, rows):
        """Puts row i of the prefilled cache `new` and of `rows` into slot rows["slot"][i]
        (an index past the cache: dropped)."""
        self.trace_counts["insert"] += 1
        slots = rows["slot"]
        t = jax.tree.leaves(new)[0].shape[jax.tree.leaves(self._length_axis)[0]]

        def put(big, small, b_axis, s_axis):
            index = [slice(None)] * big.ndim
            index[b_axis], index[s_axis] = slots, slice(0, t)
            return big.at[tuple(index)].set(small.astype(big.dtype), mode="drop")

        cache = jax.tree.map(put, cache, new, self._batch_axis, self._length_axis)
        cache = jax.lax.with_sharding_constraint(cache, self.sampler.cache_shardings())
        state = {k: v.at[slots].set(rows[k].astype(v.dtype), mode="drop") for k, v in state.items()}
        return cache, state

    def _resize_fn(self, cache, state, order, *, size):
        """A cache and state of `size` rows: row i is row order[i] of the old ones (an index
        past them: an empty, idle row)."""
        self.trace_counts["resize"] += 1
        old = state["active"].shape[0]
        valid = order < old

        def take(a, axis):
            return jnp.take(a, order, axis=axis, mode="fill", fill_value=0)

        cache = jax.tree.map(take, cache, self._batch_axis)
        cache = jax.lax.with_sharding_constraint(cache, self.sampler.cache_shardings())
        idle = _state_zeros(size)
        state = {
            k: jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), take(v, 0), idle[k])
            for k, v in state.items()
        }
        return cache, state

    def _release_fn(self, state, mask):
        self.trace_counts["release"] += 1
        return dict(
            state,
            active=state["active"] & ~mask,
            greedy=state["greedy"] | mask,
            want_lp=state["want_lp"] & ~mask,
        )

    # ------------------------------------------------------------------ host entry points
    def step(self, reach: int | None = None) -> tuple[Array, tuple[Array, Array, Array]]:
        """Queues `chunk` (k) decode steps of every slot; `reach` (optional) bounds the
        positions its choices can write or read (prompt + max_tokens), so the call may attend
        a prefix of the cache (`spans`). Returns their ([k, B, 2]
        (token, status), [k, ...] logprob arrays) still on device (reading them waits).

        A row that ends at step i is IDLE in the steps after it, so a choice's events are those
        of its rows up to its end, whatever k is."""
        s = self.sampler
        with s.context():
            span = None
            if reach is not None:
                span = next((n for n in self.spans.get(self.size, ()) if n >= reach), None)
            self.cache, self.state, out, lp = self._step_jit(
                s.params, self.cache, self.state, k=self.chunk, span=span
            )
        self.steps_by_size[self.size] += 1
        self.calls_by_span[span or self.max_seq_len] += 1
        return out, lp

    def admit(
        self, tokens: np.ndarray, ints: np.ndarray, floats: np.ndarray
    ) -> tuple[Array, tuple[Array, Array, Array]]:
        """Queues the prefill + insert of `tokens` [b, t] (see `pack_rows`) into slots < size;
        returns each row's first token as `step` does one step's, without the leading step
        axis ([b, 2] (token, status), logprob arrays), still on device."""
        s = self.sampler
        with s.context():
            new, rows, out, lp = self._prefill_jit(
                s.params, s.put(tokens), s.put(ints), s.put(floats)
            )
            self.cache, self.state = self._insert_jit(self.cache, self.state, new, rows)
        return out, lp

    def resize(self, size: int, order: Sequence[int]) -> None:
        """Queues the move to `size` slots (one of `sizes`): new slot i holds old slot
        order[i] (len(order) <= size; the other new slots are idle). Moves one bucket at a
        time (a compiled resize per pair of neighbouring sizes, not per pair of sizes)."""
        if size not in self.sizes or len(order) > min(size, self.size):
            raise ValueError(f"resize to {size} slots with {len(order)} rows; valid: {self.sizes}")
        here, there = self.sizes.index(self.size), self.sizes.index(size)
        step = 1 if there > here else -1
        for i in range(here + step, there + step, step):
            hop = self.sizes[i]
            full = np.full((hop,), self.max_batch, np.int32)  # past every size: an idle row
            full[: len(order)] = order
            s = self.sampler
            with s.context():
                self.cache, self.state = self._resize_jit(
                    self.cache, self.state, s.put(full), size=hop
                )
            self.size = hop
            order = range(len(order))  # after the first hop the rows are in place

    def warmup(self, admit_shapes: Sequence[tuple[int, int]]) -> None:
        """Compiles every call the engine can make: the step, release and neighbouring
        resizes of each size, the prefill of each admit shape (rows, prompt bucket) and its
        insert into each size that can take that many rows (at least half the row bucket: the
        engine pads a call's rows at most 2x). Leaves the slots reset.

        With several sizes, the smallest one's step is timed and its calls make as many steps
        as fit in LONE_CALL_S, LONE_CHUNK at most (that program compiled here too, for the full
        cache and each of SPANS below it)."""
        self.reset()
        for size in self.sizes:
            self.resize(size, [])  # up one size (a no-op at the first)
            for rows, t in admit_shapes:
                if size >= min(rows, max(self.sizes[0], rows // 2)):
                    self.admit(*pack_rows([], rows, t, self.max_batch))
            self.release([])
            for _ in range(2):  # the second call sees the first one's output shardings
                start = time.perf_counter()
                np.asarray(self.step()[0])
            per_step = (time.perf_counter() - start) / self.chunk
            k = int(min(LONE_CHUNK, LONE_CALL_S / max(per_step, 1e-9)))
            if size == self.sizes[0] < self.sizes[-1] and k > self.chunk:
                self.chunks[size] = k
                self.spans[size] = tuple(n for n in SPANS if n < self.max_seq_len)
                for reach in (*self.spans[size], None):
                    for _ in range(2):
                        np.asarray(self.step(reach)[0])
        for size in reversed(self.sizes):
            self.resize(size, [])  # down one size
        self.reset()
        self.steps_by_size.clear()
        self.calls_by_span.clear()

    def release(self, slots: Sequence[int]) -> None:
        """Queues the deactivation of `slots`."""
        mask = np.zeros(self.size, bool)
        mask[list(slots)] = True
        s = self.sampler
        with s.context():
            self.state = self._release_jit(self.state, s.put(mask))


Array = jax.Array


def pack_rows(rows: list[tuple[int, Any, int]], b: int, t: int, empty_slot: int):
    """The host arrays `Slots.admit` takes for `rows` of (slot, request, choice), padded to b
    rows (slot `empty_slot`, dropped) of t >= len(prompt) prompt tokens."""
    tokens = np.zeros((b, t), np.int32)
    ints = np.zeros((b, len(INT_COLUMNS) + STOP_SLOTS), np.int32)
    ints[:, 0] = empty_slot
    ints[:, len(INT_COLUMNS) :] = -1
    floats = np.ones((b, 3), np.float32)
    for i, (slot, r, c) in enumerate(rows):
        tokens[i, : len(r.prompt)] = r.prompt
        sp = r.sampling
        flags = int(sp.greedy) | (2 if r.logprobs is not None else 0)
        seed = np.array(r.seed, np.uint32).view(np.int32)
        ints[i, : len(INT_COLUMNS)] = (
            slot, r.prompt[-1], len(r.prompt) - 1, r.max_tokens, seed, c, sp.top_k, flags,
        )  # fmt: skip
        stops = sorted(r.stop_ids)
        ints[i, len(INT_COLUMNS) : len(INT_COLUMNS) + len(stops)] = stops
        floats[i] = (max(float(sp.temperature), 1e-6), sp.top_p, sp.min_p)
    return tokens, ints, floats
