"""The serving engine: continuous batching over a fixed set of slots sharing one KV cache.

It knows nothing of HTTP. One engine thread owns the device. Each of `max_batch` slots is a
row of one KV cache [.., B, ..] of `max_seq_len` positions. Between decode steps the thread
admits queued requests into free slots: the prompt minus its last token is prefilled into a
fresh one-row cache (prompt lengths bucketed to powers of two, as in `sampling.Sampler`) and
that row is copied into the slot (along the cache's batch axis only, so the rest of the cache
layout is free to change); the slot then starts decoding at the prompt's last token. A
finished or cancelled request frees its slot at once, so a long request never holds a short
one back. Every decode step runs the whole batch, each row with its own sampling parameters.

Output does not depend on the batch: choice i of a request draws its token at step s with the
key fold_in(fold_in(key(seed), i), s), exactly as row i of `Llama3.generate` does offline, and
greedy rows take the argmax. After `warmup()` no request compiles anything.

  Request          one prompt, how to continue it, and `n` choices (each its own slot).
  Token, Finished, PromptLogprobs   the events a request's callback receives.
  Engine           the slots, the queue and the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import cache_logical_axes
from llama_jax.sampling import Sampler, SamplingParams, bucket, sample_tokens

Array = jax.Array
log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # most alternatives a token's logprobs can list (OpenAI's chat limit)
PROMPT_LOGITS_BYTES = 1 << 28  # float32 logits per prompt-logprob pass are kept under this


# ----------------------------------------------------------------------------- requests
@dataclasses.dataclass
class Request:
    """One prompt to continue.

    Attributes:
      prompt: token ids, used as given (text prompts carry their BOS already).
      max_tokens: new tokens per choice (0: only `prompt_logprobs`).
      sampling: token choice; greedy when temperature is 0.
      seed: PRNG seed in [0, 2**32).
      n: independent choices; choice i equals row i of an offline batch of n copies.
      stop_ids: a choice ends at the first of these (not emitted).
      logprobs: per generated token, its logprob and this many alternatives (None: none).
      prompt_logprobs: also report the prompt tokens' logprobs (and `logprobs` alternatives).
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    n: int = 1
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token of one choice; `logprob` is log-softmax of the raw logits."""

    choice: int
    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Finished:
    """A choice has ended: reason "stop" (a stop id), "length", "cancelled" or "error"."""

    choice: int
    reason: str
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """logprob of each prompt token given the ones before (None for the first), and the
    top alternatives at each position."""

    logprobs: tuple[float | None, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


class QueueFull(Exception):
    """The engine's queue is full; try again later."""


class EngineClosed(Exception):
    """The engine has shut down."""


class Handle:
    """A submitted request: `cancel()` ends it (or one choice of it) and frees its slots."""

    def __init__(self, engine: Engine, request: Request, on_event: Callable[[Any], None]):
        self._engine = engine
        self.request = request
        self.on_event = on_event
        self.cancelled = [False] * request.n
        self.finished = [False] * request.n

    def cancel(self, choice: int | None = None) -> None:
        """Stops one choice, or all of them; thread-safe, and a no-op once finished."""
        for c in range(self.request.n) if choice is None else (choice,):
            self.cancelled[c] = True
        self._engine._withdraw(self)

    @property
    def done(self) -> bool:
        return all(self.finished)


# ----------------------------------------------------------------------------- engine
class Engine:
    """Continuous batching over `max_batch` slots of one KV cache.

    Submit with `submit(request, on_event)`; `on_event` is called on the engine thread with
    `PromptLogprobs`, `Token` and `Finished` events (it must not block).
    """

    def __init__(
        self,
        sampler: Sampler,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        max_queue: int = 64,
    ):
        """Allocates the KV cache and the jitted functions (compiled by `warmup` or first use).

        Args:
          sampler: the model's decode params and jitted prefill (see `Llama3.sampler()`).
          max_batch: slots (concurrent choices); a multiple of the mesh's data*fsdp.
          max_seq_len: positions per slot (prompt + new tokens); at most the model's.
          max_queue: requests waiting for a slot before `submit` raises QueueFull.
        """
        config = sampler.config
        limit = config.max_seq_len
        max_seq_len = limit if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
            raise ValueError(f"max_seq_len={max_seq_len!r}; valid: an int in [2, {limit}]")
        if not 2 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len}; valid: 2 to the model's {limit}")
        m = sampler.batch_multiple
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}; valid: an int >= 1")
        if max_batch % m:
            raise ValueError(
                f"max_batch={max_batch}; valid: a multiple of the mesh's data*fsdp={m}"
            )
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue={max_queue!r}; valid: an int >= 1")
        self.sampler = sampler
        self.config = config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.vocab_size = config.vocab_size
        self._rows = m  # rows of a prefill (one real, padded to the mesh's batch axes)
        self._batch_axes = _batch_axes(config)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._step_jit = jax.jit(self._step_fn, donate_argnames="cache")
        self._insert_jit = jax.jit(self._insert_fn, donate_argnames="cache")
        self._prompt_jit = jax.jit(self._prompt_fn, static_argnames="width")

        b = max_batch
        self._slot = [None] * b  # (handle, choice) or None
        self._tokens = np.zeros(b, np.int32)
        self._positions = np.zeros(b, np.int32)
        self._seeds = np.zeros(b, np.uint32)
        self._choice = np.zeros(b, np.int32)
        self._steps = np.zeros(b, np.int32)
        self._temp = np.ones(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._top_p = np.ones(b, np.float32)
        self._min_p = np.zeros(b, np.float32)
        self._greedy = np.ones(b, bool)
        self._want_lp = np.zeros(b, bool)
        with sampler._context():
            self._cache = jax.jit(
                lambda: sampler._new_cache(b, max_seq_len),
                out_shardings=sampler.cache_shardings(),
            )()

        self._lock = threading.Condition()
        self._pending: collections.deque[Handle] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = collections.Counter()  # finished choices by reason, steps, peak_active

    # ------------------------------------------------------------------ jitted pieces
    def _step_fn(self, params, cache, tokens, positions, seeds, choice, steps, sp, greedy, lp):
        """One decode step of every slot: (next tokens [B], their logprobs [B], top ids and
        logprobs [B, TOP_LOGPROBS], cache)."""
        self.trace_counts["step"] += 1
        s = self.sampler
        logits, cache = s._apply(params, tokens[:, None], positions[:, None], cache)
        cache = jax.lax.with_sharding_constraint(cache, s.cache_shardings())
        logits = logits[:, 0]  # [B, V]
        temp, top_k, top_p, min_p = sp
        keys = jax.vmap(
            lambda sd, c, st: jax.random.fold_in(jax.random.fold_in(jax.random.key(sd), c), st)
        )(seeds, choice, steps)
        row_sp = (temp[:, None], top_k[:, None], top_p[:, None], min_p[:, None])
        sort = (top_k > 0) | (top_p < 1)
        zeros = jnp.zeros(tokens.shape, jnp.int32)

        def sampled(needs_sort):
            return lambda: sample_tokens(logits, keys, *row_sp, greedy=False, needs_sort=needs_sort)

        # Each row takes the path `Llama3.generate` would take for its settings (a sort only
        # where top-k / top-p are on); a path no row needs is skipped.
        plain = jax.lax.cond(jnp.any(~greedy & ~sort), sampled(False), lambda: zeros)
        ranked = jax.lax.cond(jnp.any(~greedy & sort), sampled(True), lambda: zeros)
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(greedy, best, jnp.where(sort, ranked, plain))

        def logprobs():
            logp = jax.nn.log_softmax(logits, axis=-1)
            top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
            return jnp.take_along_axis(logp, tok[:, None], -1)[:, 0], top_ids, top_lp

        b = tokens.shape[0]
        none = (
            jnp.zeros((b,), jnp.float32),
            jnp.zeros((b, TOP_LOGPROBS), jnp.int32),
            jnp.zeros((b, TOP_LOGPROBS), jnp.float32),
        )
        tok_lp, top_ids, top_lp = jax.lax.cond(jnp.any(lp), logprobs, lambda: none)
        return tok, tok_lp, top_ids, top_lp, cache

    def _insert_fn(self, cache, new, slot):
        """Copies row 0 of the prefilled `new` cache into row `slot` of `cache`."""
        self.trace_counts["insert"] += 1

        def put(big, small, axis):
            row = jax.lax.dynamic_slice_in_dim(small, 0, 1, axis)
            return jax.lax.dynamic_update_slice_in_dim(big, row.astype(big.dtype), slot, axis)

        return jax.tree.map(put, cache, new, self._batch_axes)

    def _prompt_fn(self, params, tokens, start, *, width):
        """Logprobs of tokens[:, p + 1] given tokens[:, :p + 1] for p in start..start+width-1,
        and the top alternatives there (the full forward pass, as `Sampler.score` runs it)."""
        self.trace_counts["prompt_logprobs"] += 1
        b, t = tokens.shape
        at = jnp.minimum(start + jnp.arange(width), t - 1)
        at_rows = jnp.broadcast_to(at, (b, width))
        logits, _ = self.sampler._apply(params, tokens, None, None, at_rows)
        logp = jax.nn.log_softmax(logits[0], axis=-1)  # [W, V]
        target = tokens[0, jnp.minimum(at + 1, t - 1)]
        top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return jnp.take_along_axis(logp, target[:, None], -1)[:, 0], top_ids, top_lp

    # ------------------------------------------------------------------ host side
    def _buckets(self) -> list[int]:
        out, n = [], 1
        while True:
            t = bucket(n, self.max_seq_len)
            if not out or t != out[-1]:
                out.append(t)
            if t >= self.max_seq_len:
                return out
            n = t + 1

    def _prompt_width(self, t: int) -> int:
        """Positions per prompt-logprob pass for a bucket of t: the logits stay in budget."""
        per_pos = self.vocab_size * 4
        w = max(1, min(t, PROMPT_LOGITS_BYTES // per_pos))
        return 1 << (w.bit_length() - 1) if w < t else t

    def warmup(self) -> None:
        """Compiles every shape a request can need (each prompt bucket, the step, the slot
        insert), so that no request compiles anything."""
        for t in self._buckets():
            self._prefill(np.zeros(t, np.int32))
            self._prompt_logprobs([0] * t)
        self._insert(self._prefill(np.zeros(1, np.int32)), 0)
        self._step()
        self._tokens[:] = 0
        self._positions[:] = 0

    def _prefill(self, ids: np.ndarray) -> Any:
        """A fresh [rows, max_seq_len] cache holding `ids` in row 0."""
        t = bucket(len(ids), self.max_seq_len)
        tokens = np.zeros((self._rows, t), np.int32)
        tokens[0, : len(ids)] = ids
        lengths = np.ones((self._rows,), np.int32)
        lengths[0] = len(ids)
        _, cache = self.sampler.prefill(tokens, lengths, self.max_seq_len)
        return cache

    def _insert(self, new: Any, slot: int) -> None:
        with self.sampler._context():
            self._cache = self._insert_jit(self._cache, new, jnp.int32(slot))

    def _prompt_logprobs(self, ids: Sequence[int]) -> PromptLogprobs:
        n = len(ids)
        t = bucket(n, self.max_seq_len)
        tokens = np.zeros((self._rows, t), np.int32)
        tokens[0, :n] = ids
        width = self._prompt_width(t)
        s = self.sampler
        lps, tops = [None], []
        with s._context():
            dev = s._put(tokens)
            for start in range(0, max(n - 1, 0), width):
                lp, ids_, tlp = self._prompt_jit(s.params, dev, jnp.int32(start), width=width)
                lp, ids_, tlp = np.asarray(lp), np.asarray(ids_), np.asarray(tlp)
                k = min(width, n - 1 - start)
                lps += lp[:k].tolist()
                tops += [tuple(zip(ids_[i].tolist(), tlp[i].tolist())) for i in range(k)]
        return PromptLogprobs(tuple(lps), ((),) + tuple(tops))

    def _step(self):
        s = self.sampler
        sp = (
            s._put(self._temp),
            s._put(self._top_k),
            s._put(self._top_p),
            s._put(self._min_p),
        )
        with s._context():
            tok, tok_lp, top_ids, top_lp, self._cache = self._step_jit(
                s.params,
                self._cache,
                s._put(self._tokens),
                s._put(self._positions),
                s._put(self._seeds),
                s._put(self._choice),
                s._put(self._steps),
                sp,
                s._put(self._greedy),
                s._put(self._want_lp),
            )
        want = bool(self._want_lp.any())
        return (
            np.asarray(tok),
            np.asarray(tok_lp) if want else None,
            np.asarray(top_ids) if want else None,
            np.asarray(top_lp) if want else None,
        )

    # ------------------------------------------------------------------ public API
    def check(self, request: Request) -> None:
        """Raises ValueError naming the first bad field of `request`."""
        r, limit = request, self.max_seq_len
        if not isinstance(r.sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(r.sampling).__name__}")
        n = len(r.prompt)
        if n == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        bad = [t for t in r.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 0:
            raise ValueError(f"max_tokens={r.max_tokens!r}; valid: an int >= 0")
        if r.max_tokens == 0 and not r.prompt_logprobs:
            raise ValueError("max_tokens=0; valid: >= 1 (0 only to score the prompt, with echo)")
        if n + r.max_tokens > limit:
            raise ValueError(
                f"the prompt has {n} tokens and max_tokens={r.max_tokens}: together more than "
                f"the server's context of {limit} tokens; shorten the prompt or lower max_tokens"
            )
        if isinstance(r.n, bool) or not isinstance(r.n, int) or not 1 <= r.n <= self.max_batch:
            raise ValueError(f"n={r.n!r}; valid: an int in [1, {self.max_batch}] (the slots)")
        if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed < 2**32:
            raise ValueError(f"seed={r.seed!r}; valid: an int in [0, 2**32)")
        lp = r.logprobs
        if lp is not None and (
            isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= TOP_LOGPROBS
        ):
            raise ValueError(f"logprobs={lp!r}; valid: an int in [0, {TOP_LOGPROBS}]")

    def submit(self, request: Request, on_event: Callable[[Any], None]) -> Handle:
        """Queues `request`; `on_event` then receives its events on the engine thread.

        Raises:
          ValueError: a bad request (nothing is queued).
          QueueFull: max_queue requests are already waiting.
          EngineClosed: after `close()`.
        """
        request.prompt = [int(t) for t in request.prompt]
        self.check(request)
        handle = Handle(self, request, on_event)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine has shut down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} requests are already waiting (max_queue="
                    f"{self.max_queue}); retry later"
                )
            self._pending.append(handle)
            self._lock.notify()
        return handle

    def start(self) -> None:
        """Starts the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama_jax-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stops the engine thread; queued and running requests finish as "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        for h in list(self._pending):
            self._finish_all(h, "cancelled")
        for s in range(self.max_batch):
            if self._slot[s] is not None:
                h, c = self._slot[s]
                self._free(s)
                self._finish(h, c, "cancelled")

    @property
    def active(self) -> int:
        """Slots in use."""
        return sum(s is not None for s in self._slot)

    @property
    def pending(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    def _withdraw(self, handle: Handle) -> None:
        """A cancelled request leaves the queue at once (its place is free for another)."""
        with self._lock:
            if all(handle.cancelled) and handle in self._pending:
                self._pending.remove(handle)
                # Finished on the engine thread's terms: under the lock, never concurrently.
                self._finish_all(handle, "cancelled")
            self._lock.notify()

    # ------------------------------------------------------------------ the engine thread
    def _emit(self, handle: Handle, event: Any) -> None:
        try:
            handle.on_event(event)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
            log.exception("request callback failed; cancelling the request")
            handle.cancel()

    def _finish(self, handle: Handle, choice: int, reason: str, error: str | None = None):
        if not handle.finished[choice]:
            handle.finished[choice] = True
            self.stats[reason] += 1
            self._emit(handle, Finished(choice, reason, error))

    def _finish_all(self, handle: Handle, reason: str, error: str | None = None):
        for c in range(handle.request.n):
            self._finish(handle, c, reason, error)

    def _free(self, s: int) -> None:
        self._slot[s] = None
        self._greedy[s] = True  # an idle slot never needs the sampling paths
        self._want_lp[s] = False

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._pending and self.active == 0:
                    self._lock.wait()
                if self._closed:
                    return
            try:
                self._admit()
                self._drop_cancelled()
                if self.active:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("engine step failed")
                for s in range(self.max_batch):
                    if self._slot[s] is not None:
                        h, c = self._slot[s]
                        self._free(s)
                        self._finish(h, c, "error", f"{type(e).__name__}: {e}")
                with self.sampler._context():
                    self._cache = jax.jit(
                        lambda: self.sampler._new_cache(self.max_batch, self.max_seq_len),
                        out_shardings=self.sampler.cache_shardings(),
                    )()

    def _admit(self) -> None:
        """Moves queued requests into free slots (first come, first served)."""
        while True:
            free = [s for s in range(self.max_batch) if self._slot[s] is None]
            with self._lock:
                if not self._pending or len(free) < self._pending[0].request.n:
                    return
                h = self._pending.popleft()
            r = h.request
            if all(h.cancelled):
                self._finish_all(h, "cancelled")
                continue
            try:
                if r.prompt_logprobs:
                    self._emit(h, self._prompt_logprobs(r.prompt))
                if r.max_tokens == 0:
                    self._finish_all(h, "length")
                    continue
                head = np.asarray(r.prompt[:-1], np.int32)
                new = self._prefill(head) if len(head) else None
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                self._finish_all(h, "error", f"{type(e).__name__}: {e}")
                continue
            sp = r.sampling
            for c, s in zip(range(r.n), free):
                if h.cancelled[c]:
                    self._finish(h, c, "cancelled")
                    continue
                if new is not None:
                    self._insert(new, s)
                self._slot[s] = (h, c)
                self._tokens[s] = r.prompt[-1]
                self._positions[s] = len(r.prompt) - 1
                self._seeds[s] = r.seed
                self._choice[s] = c
                self._steps[s] = 0
                self._temp[s] = max(float(sp.temperature), 1e-6)
                self._top_k[s] = sp.top_k
                self._top_p[s] = sp.top_p
                self._min_p[s] = sp.min_p
                self._greedy[s] = sp.greedy
                self._want_lp[s] = r.logprobs is not None
            self.stats["peak_active"] = max(self.stats["peak_active"], self.active)

    def _drop_cancelled(self) -> None:
        for s in range(self.max_batch):
            if self._slot[s] is not None:
                h, c = self._slot[s]
                if h.cancelled[c]:
                    self._free(s)
                    self._finish(h, c, "cancelled")

    def _decode(self) -> None:
        tok, tok_lp, top_ids, top_lp = self._step()
        self.stats["steps"] += 1
        for s in range(self.max_batch):
            if self._slot[s] is None:
                continue
            h, c = self._slot[s]
            r = h.request
            t = int(tok[s])
            self._steps[s] += 1
            if t in r.stop_ids:
                self._free(s)
                self._finish(h, c, "stop")
                continue
            if r.logprobs is None:
                self._emit(h, Token(c, t))
            else:
                k = r.logprobs
                top = tuple(zip(top_ids[s, :k].tolist(), top_lp[s, :k].tolist()))
                self._emit(h, Token(c, t, float(tok_lp[s]), top))
            if self._steps[s] >= r.max_tokens:
                self._free(s)
                self._finish(h, c, "length")
                continue
            self._tokens[s] = t
            self._positions[s] += 1


def _batch_axes(config: Any) -> Any:
    """The batch axis of each cache leaf, from the cache's logical axes."""
    return jax.tree.map(
        lambda axes: axes.index("batch"),
        cache_logical_axes(config),
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(x, str) for x in a),
    )


__all__ = [
    "Engine",
    "EngineClosed",
    "Finished",
    "Handle",
    "PromptLogprobs",
    "QueueFull",
    "Request",
    "Token",
    "TOP_LOGPROBS",
]
