"""The engine's device side: one KV cache of `max_batch` slots and every slot's decode state,
advanced by jitted calls that never wait for the host.

Each slot's state lives on device as [B] arrays (next input token, position, tokens made,
budget, seed, choice index, sampling settings, stop ids [B, STOP_SLOTS], active), so one decode
step of all slots is one call whose inputs are its own previous outputs: the host can queue
step k+1 before it has read step k's tokens, and reads one [B, 2] int32 array per step.

  step     all slots, `decode_chunk` steps (a fixed-trip scan, as in Sampler): one token
           each a step (each row its own sampling settings and key), stop ids and exhausted
           budgets detected on device. Returns (token, status) per row:
           IDLE, TOKEN, LAST (the token ends the choice: length) or STOP (a stop id, not
           emitted).
  admit    b new prompts at once: prefill [b, t] (rows and length bucketed) into a fresh
           cache, scatter it into their slots, write their state rows. Rows padded to the
           bucket carry slot index B and are dropped by the scatters.
  release  deactivates slots (cancelled on the host).
  prompt_logprobs   the prompt's own token logprobs (echo + logprobs), the full forward pass.

Randomness: choice c draws its token at step s with fold_in(fold_in(key(seed), c), s), as row c
of `Llama3.generate` does offline, so output does not depend on the slot or the batch.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.inference.sampler import Sampler, bucket, sample_tokens
from llama_jax.model import sharding
from llama_jax.model.transformer import cache_logical_axes
from llama_jax.serve.requests import STOP_SLOTS, TOP_LOGPROBS, PromptLogprobs

IDLE, TOKEN, LAST, STOP = 0, 1, 2, 3  # per-row status of a step
PROMPT_LOGITS_BYTES = 1 << 28  # float32 logits per prompt-logprob pass are kept under this
# Columns of the int32 rows `admit` takes (then the stop ids); flags: 1 greedy, 2 logprobs.
# Its float rows: temperature, top_p, min_p.
INT_COLUMNS = ("slot", "tokens", "positions", "max_tokens", "seeds", "choice", "top_k", "flags")


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


class Slots:
    """The KV cache and slot state on the sampler's mesh, and the jitted calls on them."""

    def __init__(
        self, sampler: Sampler, max_batch: int, max_seq_len: int, decode_chunk: int | None = None
    ):
        """Args: the sampler (model, mesh), slots, positions per slot, and decode steps per
        `step` call (None: the sampler's decode_chunk)."""
        self.sampler = s = sampler
        self.decode_chunk = int(decode_chunk or sampler.decode_chunk)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size = sampler.config.vocab_size
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
            donate_argnums=(1, 2),
            out_shardings=(cache_sh, state_sh, None, None),
            compiler_options=s.compiler_options or None,  # the sampler's decode options
        )
        self._admit_jit = jax.jit(
            self._admit_fn, donate_argnums=(1, 2), out_shardings=(cache_sh, state_sh)
        )
        self._release_jit = jax.jit(self._release_fn, donate_argnums=(0,), out_shardings=state_sh)
        self._prompt_jit = jax.jit(self._prompt_fn, static_argnames="width")
        self._new_jit = jax.jit(
            lambda: (s.new_cache(max_batch, max_seq_len), _state_zeros(max_batch)),
            out_shardings=(cache_sh, state_sh),
        )
        self.reset()

    def reset(self) -> None:
        """A zeroed cache and all slots idle (at start, and after a failed call)."""
        with self.sampler.context():
            self.cache, self.state = self._new_jit()

    # ------------------------------------------------------------------ jitted functions
    def _step_fn(self, params, cache, state):
        """decode_chunk steps of every slot in a fixed-trip scan; outputs stacked [k, ...]."""
        self.trace_counts["step"] += 1

        def one(carry, _):
            cache, state, out, lp = self._one_step(params, *carry)
            return (cache, state), (out, lp)

        (cache, state), (out, lp) = jax.lax.scan(
            one, (cache, state), None, length=self.decode_chunk
        )
        return cache, state, out, lp

    def _one_step(self, params, cache, state):
        s, st = self.sampler, state
        logits, cache = s.apply(params, st["tokens"][:, None], st["positions"][:, None], cache)
        cache = jax.lax.with_sharding_constraint(cache, s.cache_shardings())
        logits = logits[:, 0]  # [B, V]
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
        return cache, state, jnp.stack([tok, status], axis=1), lp

    def _admit_fn(self, params, cache, state, tokens, ints, floats):
        """Prefills tokens [b, t] (each row a prompt minus its last token, right-padded) and
        puts row i into slot ints[i, 0] with the state of ints/floats' row i."""
        self.trace_counts["admit"] += 1
        s = self.sampler
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Logits at one position only: the prefill is for the cache (the first token comes
        # from the decode step of the prompt's last token).
        _, new = s.apply(params, tokens, positions, s.new_cache(b, t), jnp.zeros((b, 1), int))
        slots = ints[:, 0]

        def put(big, small, b_axis, s_axis):
            index = [slice(None)] * big.ndim
            index[b_axis], index[s_axis] = slots, slice(0, t)
            return big.at[tuple(index)].set(small.astype(big.dtype), mode="drop")

        cache = jax.tree.map(put, cache, new, self._batch_axis, self._length_axis)
        cache = jax.lax.with_sharding_constraint(cache, s.cache_shardings())
        rows = {name: ints[:, i] for i, name in enumerate(INT_COLUMNS)}
        flags = rows.pop("flags")
        del rows["slot"]
        rows.update(
            seeds=jax.lax.bitcast_convert_type(rows["seeds"], jnp.uint32),
            greedy=(flags & 1) != 0,
            want_lp=(flags & 2) != 0,
            steps=jnp.zeros((b,), jnp.int32),
            active=jnp.ones((b,), bool),
            temp=floats[:, 0],
            top_p=floats[:, 1],
            min_p=floats[:, 2],
            stops=ints[:, len(INT_COLUMNS) :],
        )
        state = {k: v.at[slots].set(rows[k].astype(v.dtype), mode="drop") for k, v in state.items()}
        return cache, state

    def _release_fn(self, state, mask):
        self.trace_counts["release"] += 1
        return dict(
            state,
            active=state["active"] & ~mask,
            greedy=state["greedy"] | mask,
            want_lp=state["want_lp"] & ~mask,
        )

    def _prompt_fn(self, params, tokens, start, *, width):
        """Logprobs of tokens[:, p + 1] given tokens[:, :p + 1] for p in start..start+width-1,
        and the top alternatives there (the full forward pass, as `Sampler.score` runs it)."""
        self.trace_counts["prompt_logprobs"] += 1
        b, t = tokens.shape
        at = jnp.minimum(start + jnp.arange(width), t - 1)
        at_rows = jnp.broadcast_to(at, (b, width))
        logits, _ = self.sampler.apply(params, tokens, None, None, at_rows)
        logp = jax.nn.log_softmax(logits[0], axis=-1)  # [W, V]
        target = tokens[0, jnp.minimum(at + 1, t - 1)]
        top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return jnp.take_along_axis(logp, target[:, None], -1)[:, 0], top_ids, top_lp

    # ------------------------------------------------------------------ host entry points
    def step(self) -> tuple[Array, tuple[Array, Array, Array]]:
        """Queues `decode_chunk` (k) decode steps of every slot; returns their ([k, B, 2]
        (token, status), [k, ...] logprob arrays) still on device (reading them waits).

        A row that ends at step i is IDLE in the steps after it, so a choice's events are those
        of its rows up to its end, whatever k is."""
        s = self.sampler
        with s.context():
            self.cache, self.state, out, lp = self._step_jit(s.params, self.cache, self.state)
        return out, lp

    def admit(self, tokens: np.ndarray, ints: np.ndarray, floats: np.ndarray) -> None:
        """Queues the prefill + insert of `tokens` [b, t] (see `pack_rows`)."""
        s = self.sampler
        with s.context():
            self.cache, self.state = self._admit_jit(
                s.params, self.cache, self.state, s.put(tokens), s.put(ints), s.put(floats)
            )

    def release(self, slots: Sequence[int]) -> None:
        """Queues the deactivation of `slots`."""
        mask = np.zeros(self.max_batch, bool)
        mask[list(slots)] = True
        s = self.sampler
        with s.context():
            self.state = self._release_jit(self.state, s.put(mask))

    def prompt_width(self, t: int) -> int:
        """Positions per prompt-logprob pass for a bucket of t: the logits stay in budget."""
        w = max(1, min(t, PROMPT_LOGITS_BYTES // (self.vocab_size * 4)))
        return 1 << (w.bit_length() - 1) if w < t else t

    def prompt_logprobs(self, ids: Sequence[int], rows: int) -> PromptLogprobs:
        """Each prompt token's logprob and top alternatives (waits for the result)."""
        n = len(ids)
        t = bucket(n, self.max_seq_len)
        tokens = np.zeros((rows, t), np.int32)
        tokens[0, :n] = ids
        width = self.prompt_width(t)
        s = self.sampler
        lps, tops = [None], []
        with s.context():
            dev = s.put(tokens)
            for start in range(0, max(n - 1, 0), width):
                lp, ids_, tlp = self._prompt_jit(s.params, dev, np.int32(start), width=width)
                lp, ids_, tlp = np.asarray(lp), np.asarray(ids_), np.asarray(tlp)
                k = min(width, n - 1 - start)
                lps += lp[:k].tolist()
                tops += [tuple(zip(ids_[i].tolist(), tlp[i].tolist())) for i in range(k)]
        return PromptLogprobs(tuple(lps), ((),) + tuple(tops))


Array = jax.Array


def pack_rows(rows: list[tuple[int, Any, int]], b: int, t: int, empty_slot: int):
    """The host arrays `Slots.admit` takes for `rows` of (slot, request, choice), padded to b
    rows (slot `empty_slot`, dropped) of t prompt tokens."""
    tokens = np.zeros((b, t), np.int32)
    ints = np.zeros((b, len(INT_COLUMNS) + STOP_SLOTS), np.int32)
    ints[:, 0] = empty_slot
    ints[:, len(INT_COLUMNS) :] = -1
    floats = np.ones((b, 3), np.float32)
    for i, (slot, r, c) in enumerate(rows):
        head = r.prompt[:-1]
        tokens[i, : len(head)] = head
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
