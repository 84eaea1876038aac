"""The serving engine: continuous batching over a fixed set of slots sharing one KV cache.

It knows nothing of HTTP. One engine thread owns the device; the device side (`slots.py`) holds
every slot's state, so each decode step is one jitted call for all slots whose inputs are its
own outputs. The device holds only as many slots as the load needs: the smallest of a few
compiled sizes (`slot_buckets`: 1, 2, 4, 8, 16) that fits the choices in use, which the engine
keeps at the front (moving them with one `resize` call when the size changes), so one client
runs batch-1 steps and 16 run one 16-row step. The thread's loop, per step:

  1. cancelled choices free their slots (one `release` call for all of them);
  2. queued requests take free slots, first come first served (the slots are first resized to
     the size that fits them all, or shrunk when fewer are in use), and are prefilled together
     in bucketed prefill + insert calls (`admit`: one for a burst of short prompts; split where
     rows x prompt bucket would pass PREFILL_TOKENS or padding would double the rows); the
     prefill also picks each choice's first token, as `Llama3.generate`'s does;
  3. the next decode step is queued (not waited for), unless every choice in use has its
     budget's last step queued already (a step that only ends rows would delay the next
     request by a whole step);
  4. the previous loop's outputs (its admits' first tokens, then its step's (token, status)
     [B, 2]) are read: one transfer a call, while the device is busy with the calls just
     queued; rows whose choice ended free their slot;
  5. those events go to their requests in one batch through `deliver` (by default on the
     engine thread; the HTTP app hands the batch to its event loop in one call, so per-token
     work - callbacks, detokenisation, streaming - never runs on the engine thread).

The host does O(1) Python per step, plus O(1) per request admitted or ended. A finished or
cancelled request frees its slot at once, so a long request never holds a short one back.

Output does not depend on the batch: choice i of a request draws its token at step s with the
key fold_in(fold_in(key(seed), i), s), exactly as row i of `Llama3.generate` does offline, and
greedy rows take the argmax. After `warmup()` no request compiles anything.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llama_jax.inference.sampler import Sampler, bucket
from llama_jax.inference.scoring import Scorer
from llama_jax.serve.requests import (
    TOP_LOGPROBS,
    EngineClosed,
    Finished,
    Handle,
    PromptLogprobs,
    QueueFull,
    Request,
    Token,
    check_request,
    log,
)
from llama_jax.serve.slots import LAST, STOP, Slots, pack_rows

PREFILL_TOKENS = 2048  # rows x prompt bucket of one admit call (more: split into several)
PROMPT_LOGITS_BYTES = 1 << 28  # float32 logits per prompt-logprob pass are kept under this
DEFAULT_MAX_SEQ_LEN = 4096  # positions per slot unless asked: 16 x 128k would not fit memory


def _inline(batch: Callable[[], None]) -> None:
    batch()


class Engine:
    """Continuous batching over `max_batch` slots of one KV cache.

    Submit with `submit(request, on_event)`; `on_event` receives `PromptLogprobs`, `Token` and
    `Finished` events, in order, on the thread `deliver` runs batches on (it must not block).
    """

    def __init__(
        self,
        sampler: Sampler,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        max_queue: int = 64,
        deliver: Callable[[Callable[[], None]], None] | None = None,
        decode_chunk: int | None = None,
        slot_buckets: Sequence[int] | None = None,
    ):
        """Allocates the KV cache and the jitted functions (compiled by `warmup` or first use).

        Args:
          sampler: the model's decode params and mesh (see `Llama3.sampler()`).
          max_batch: slots (concurrent choices); a multiple of the mesh's data*fsdp.
          max_seq_len: positions per slot (prompt + new tokens); at most the model's, and by
            default the model's capped at DEFAULT_MAX_SEQ_LEN.
          max_queue: requests waiting for a slot before `submit` raises QueueFull.
          deliver: called on the engine thread with each batch of events (a no-argument
            function that calls the requests' `on_event`); run it where the callbacks should
            run. None: run it at once, on the engine thread.
          decode_chunk: decode steps per device call (each call's tokens are read and
            delivered together; admissions and cancellations take effect between calls).
            None: the sampler's (1 on CPU; more on a GPU, where a call's fixed cost is
            amortised over k tokens for at most k - 1 steps of extra admission latency).
            `warmup` may raise it at the smallest slot count, where one cheap step's fixed
            cost on the host matters most (serve/slots.py, LONE_CHUNK).
          slot_buckets: the slot counts the decode step is compiled for, ascending, each a
            multiple of the mesh's data*fsdp, the last = max_batch; the step runs on the
            smallest that holds the choices in use. None: 1, 2, 4, ... (times data*fsdp) and
            max_batch. (max_batch,) steps every slot whatever the load (the engine before
            buckets; benchmarks compare the two).
        """
        config = sampler.config
        limit = config.max_seq_len
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
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
        if slot_buckets is not None:
            sizes = list(slot_buckets)
            if (
                not sizes
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes)
                or sizes != sorted(set(sizes))
                or sizes[-1] != max_batch
                or any(b % m for b in sizes)
            ):
                raise ValueError(
                    f"slot_buckets={slot_buckets!r}; valid: ascending ints, each a multiple of "
                    f"the mesh's data*fsdp={m}, the last = max_batch={max_batch}"
                )
        self.sampler = sampler
        self.config = config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.vocab_size = config.vocab_size
        self.deliver = deliver or _inline
        self.slots = Slots(sampler, max_batch, max_seq_len, decode_chunk, slot_buckets)
        # Prompt logprobs (echo + logprobs) go through the one log-likelihood engine, on the
        # sampler's own params and model call (so they match generation's logprobs).
        self.scorer = Scorer.from_sampler(sampler, max_batch_bytes=PROMPT_LOGITS_BYTES)
        self._multiple = m
        # Prefill rows: the mesh's batch axes times powers of 4, and max_batch (fewer shapes to
        # compile than powers of 2; `_chunks` splits a group rather than pad it over 2x).
        self._row_buckets = [m * 4**i for i in range(max_batch) if m * 4**i < max_batch]
        self._row_buckets.append(max_batch)
        self._prefill_tokens = max(PREFILL_TOKENS, m * max_seq_len)

        self._slot: list[tuple[Handle, int] | None] = [None] * max_batch
        # Per slot, the decode step (counted in `_stepped`) by which its choice has had every
        # step its budget allows: once every choice in use is there, no further call is
        # queued (a step past the end would cost a whole step of the next request's latency).
        self._ends = [0] * max_batch
        self._stepped = 0  # decode steps queued so far (Slots.chunk per call)
        self._used = 0  # slots holding a choice (the host's view)
        self._lp_slots = 0  # of those, choices that want logprobs
        self._lock = threading.Condition()
        self._pending: collections.deque[Handle] = collections.deque()
        self._cancels: list[Handle] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = collections.Counter()  # finished choices by reason, steps, peak_active

    @property
    def steps_by_size(self) -> collections.Counter[int]:
        """Decode calls run so far per slot count (the engine's record of the bucket each
        step ran on); warm-up's are not counted."""
        return self.slots.steps_by_size

    @property
    def trace_counts(self) -> collections.Counter[str]:
        """How often each jitted function was traced (= compiled); for tests."""
        return self.slots.trace_counts + self.scorer.trace_counts

    # ------------------------------------------------------------------ shapes
    def _prompt_buckets(self) -> list[int]:
        out, n = [], 1
        while True:
            t = bucket(n, self.max_seq_len)
            if not out or t != out[-1]:
                out.append(t)
            if t >= self.max_seq_len:
                return out
            n = t + 1

    def _row_bucket(self, rows: int) -> int:
        return next(b for b in self._row_buckets if b >= rows)

    def _fits(self, rows: int, t: int) -> bool:
        b = self._row_bucket(rows)
        return b == self._row_buckets[0] or b * t <= self._prefill_tokens

    def _chunks(self, rows: list) -> list[tuple[list, int, int]]:
        """Splits rows (sorted by prompt length) into admit calls: (rows, row bucket, prompt
        bucket), each within PREFILL_TOKENS, padding at most 2x (or to the smallest bucket)."""
        out, i = [], 0
        while i < len(rows):
            left = len(rows) - i

            def t_of(k, i=i, left=left):
                return bucket(len(rows[i + min(k, left) - 1][1].prompt), self.max_seq_len)

            fitting = [b for b in self._row_buckets if self._fits(b, t_of(b))]
            below = [b for b in fitting if b <= left] or fitting[:1]
            b = below[-1]
            above = [b2 for b2 in fitting if b2 >= left and 2 * left >= b2]
            if above and above[0] > b:
                b = above[0]
            k = min(b, left)
            out.append((rows[i : i + k], b, t_of(k)))
            i += k
        return out

    def warmup(self) -> None:
        """Compiles every shape a request can need (prompt logprobs; each admit bucket, and
        the step, release and resizes of each slot count), so that no request compiles
        anything."""
        self.scorer.warm_token_logprobs(self.max_seq_len, TOP_LOGPROBS)
        shapes = [(b, t) for t in self._prompt_buckets() for b in self._row_buckets]
        self.slots.warmup([(b, t) for b, t in shapes if self._fits(b, t)])

    # ------------------------------------------------------------------ public API
    def check(self, request: Request) -> None:
        """Raises ValueError naming the first bad field of `request`."""
        check_request(request, self.vocab_size, self.max_seq_len, self.max_batch)

    def submit(self, request: Request, on_event: Callable[[Any], None]) -> Handle:
        """Queues `request`; `on_event` then receives its events (see the class).

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
        out: list = []
        for h in list(self._pending):
            self._finish_all(h, "cancelled", out)
        self._pending.clear()
        for s in range(self.max_batch):
            if self._slot[s] is not None:
                h, c = self._slot[s]
                self._free(s)
                self._finish(h, c, "cancelled", out)
        self._send(out, None)

    @property
    def active(self) -> int:
        """Slots in use."""
        return self._used

    @property
    def pending(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    def _withdraw(self, handle: Handle) -> None:
        """A cancel: a queued request leaves the queue at once (its place is free for another);
        a running one's slots are freed by the engine thread before its next step."""
        with self._lock:
            if all(handle.cancelled) and handle in self._pending:
                self._pending.remove(handle)
                out: list = []
                self._finish_all(handle, "cancelled", out)
                self._send(out, None)
            else:
                self._cancels.append(handle)
            self._lock.notify()

    # ------------------------------------------------------------------ bookkeeping
    def _finish(self, h: Handle, c: int, reason: str, out: list, error: str | None = None):
        if not h.finished[c]:
            h.finished[c] = True
            self.stats[reason] += 1
            out.append((h, Finished(c, reason, error)))

    def _finish_all(self, h: Handle, reason: str, out: list, error: str | None = None):
        for c in range(h.request.n):
            self._finish(h, c, reason, out, error)

    def _free(self, s: int) -> None:
        h, _ = self._slot[s]
        self._slot[s] = None
        self._used -= 1
        self._lp_slots -= h.request.logprobs is not None

    def _send(self, out: list, step: list | None) -> None:
        """Hands one batch of events to `deliver`: the loose ones first, then the calls'."""
        if not out and step is None:
            return

        def batch():
            for h, event in out:
                h.emit(event)
            for call in step or ():
                _dispatch(*call)

        try:
            self.deliver(batch)
        except Exception:  # noqa: BLE001 - e.g. the listener's event loop has closed
            log.exception("could not deliver events")

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        inflight = None  # the queued calls: [(device outputs, slot snapshot, logprobs wanted)]
        while True:
            with self._lock:
                while (
                    not self._closed
                    and not self._pending
                    and not self._cancels
                    and not self._used
                    and inflight is None
                ):
                    self._lock.wait()
                if self._closed:
                    return
                cancels, self._cancels = self._cancels, []
            out: list = []
            step = None
            try:
                self._release(cancels, out)
                queued = self._admit(out)  # their first tokens, then the step's
                if self._used and self._steps_left():
                    snapshot = tuple(self._slot[: self.slots.size])
                    reach = max(
                        len(e[0].request.prompt) + e[0].request.max_tokens
                        for e in snapshot
                        if e is not None
                    )
                    queued.append((*self.slots.step(reach), snapshot, self._lp_slots > 0))
                    self._stepped += self.slots.chunk
                    self.stats["steps"] += 1
                if inflight is not None:
                    step = self._collect(inflight)
                inflight = queued or None
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("engine step failed")
                for s in range(self.max_batch):
                    if self._slot[s] is not None:
                        h, c = self._slot[s]
                        self._free(s)
                        self._finish(h, c, "error", out, f"{type(e).__name__}: {e}")
                step = inflight = None
                self.slots.reset()
            self._send(out, step)

    def _steps_left(self) -> bool:
        """Whether a choice in use can still make a token after the calls already queued
        (else the next call would only find every row ended: its last step is in flight)."""
        at = self._stepped
        return any(self._ends[s] > at for s in range(self.slots.size) if self._slot[s] is not None)

    def _release(self, cancels: list[Handle], out: list) -> None:
        freed = []
        for h in cancels:
            for c, s in enumerate(h.slots):
                if not h.cancelled[c] or h.finished[c] or s is None:
                    continue  # still queued: dropped when admitted
                entry = self._slot[s]
                if entry is not None and entry[0] is h and entry[1] == c:
                    self._free(s)
                    freed.append(s)
                    self._finish(h, c, "cancelled", out)
        if freed:
            self.slots.release(freed)

    def _admit(self, out: list) -> list[tuple]:
        """Moves queued requests into free slots (first come, first served), then prefills
        all of their rows in as few admit calls as PREFILL_TOKENS allows. The slots are
        resized first to the smallest size that holds every choice (or shrunk, with nothing
        queued, once fewer are in use). Returns the admit calls' first tokens, as `_collect`
        takes them: (device outputs, row snapshot, logprobs wanted) per call."""
        taken = []  # (handle, choices to run)
        free = self.max_batch - self._used
        while self._pending:
            with self._lock:
                if not self._pending:
                    break
                h = self._pending[0]
                r = h.request
                need = 0 if r.max_tokens == 0 else sum(not x for x in h.cancelled)
                if need > free:
                    break
                self._pending.popleft()
            if not any(not x for x in h.cancelled):
                self._finish_all(h, "cancelled", out)
                continue
            if r.prompt_logprobs:
                try:
                    out.append((h, self._prompt_logprobs(r.prompt)))
                except Exception as e:  # noqa: BLE001 - this request fails, not the server
                    log.exception("prompt logprobs failed")
                    self._finish_all(h, "error", out, f"{type(e).__name__}: {e}")
                    continue
            if r.max_tokens == 0:
                self._finish_all(h, "length", out)
                continue
            choices = []
            for c in range(r.n):
                if h.cancelled[c]:
                    self._finish(h, c, "cancelled", out)
                else:
                    choices.append(c)
            taken.append((h, choices))
            free -= len(choices)
        self._fit(self._used + sum(len(c) for _, c in taken))
        if not taken:
            return []
        free_slots = [s for s in range(self.slots.size) if self._slot[s] is None]
        rows = []  # (slot, request, choice)
        for h, choices in taken:
            for c in choices:
                s = free_slots.pop(0)
                self._slot[s] = (h, c)
                self._ends[s] = self._stepped + h.request.max_tokens - 1  # 1st: the admit's
                h.slots[c] = s
                self._used += 1
                self._lp_slots += h.request.logprobs is not None
                rows.append((s, h.request, c))
        self.stats["peak_active"] = max(self.stats["peak_active"], self._used)
        rows.sort(key=lambda row: len(row[1].prompt))  # similar lengths share a call
        calls = []
        for chunk, b, t in self._chunks(rows):
            got = self.slots.admit(*pack_rows(chunk, b, t, self.max_batch))
            snapshot = tuple(self._slot[s] for s, _, _ in chunk) + (None,) * (b - len(chunk))
            calls.append((*got, snapshot, any(r.logprobs is not None for _, r, _ in chunk)))
            self.stats["admit_calls"] += 1
        return calls

    def _fit(self, count: int) -> None:
        """Resizes the slots to the smallest size holding `count` choices, when that is not
        the size now; the choices in use move to the front, in slot order."""
        size = next(b for b in self.slots.sizes if b >= count)
        if size == self.slots.size:
            return
        order = [s for s in range(self.slots.size) if self._slot[s] is not None]
        self.slots.resize(size, order)
        moved = [(self._slot[s], self._ends[s]) for s in order]
        self._slot = [None] * self.max_batch
        for new, (entry, end) in enumerate(moved):
            self._slot[new] = entry
            self._ends[new] = end
            h, c = entry
            h.slots[c] = new
        self.stats["resizes"] += 1

    def _prompt_logprobs(self, ids: list[int]) -> PromptLogprobs:
        """Each prompt token's logprob and top alternatives (waits for the result)."""
        got = self.scorer.token_logprobs(ids, TOP_LOGPROBS)
        top = [tuple(zip(i.tolist(), lp.tolist())) for i, lp in zip(got.top_ids, got.top_logprobs)]
        return PromptLogprobs((None, *got.logprobs.tolist()), ((), *top))

    def _collect(self, calls: list[tuple]) -> list[tuple]:
        """Reads the outputs of one loop's calls (admits, then the step), in order; frees
        the slots of choices that ended there."""
        return [self._collect_call(*call) for call in calls]

    def _collect_call(self, out_dev: Any, lp_dev: Any, snapshot: tuple, want_lp: bool) -> tuple:
        """Reads a call's outputs ([k, B, 2], or an admit's [B, 2]: one step); frees the
        slots of choices that ended there."""
        out = np.asarray(out_dev)  # the next call is already queued behind it
        one = out.ndim == 2  # an admit's first tokens
        if one:
            out = out[None]
        for s in np.flatnonzero((out[:, :, 1] >= LAST).any(axis=0)).tolist():
            entry = snapshot[s]
            if entry is None:
                continue
            h, c = entry
            now = h.slots[c]  # where the choice is now (a resize may have moved it)
            if now is not None and self._slot[now] is entry:
                self._free(now)
                h.finished[c] = True
                ended = out[:, s, 1][out[:, s, 1] >= LAST][0]
                self.stats["stop" if ended == STOP else "length"] += 1
        lp = None
        if want_lp:
            lp = tuple(np.asarray(a)[None] if one else np.asarray(a) for a in lp_dev)
        return snapshot, out, lp


def _dispatch(snapshot: tuple, out: np.ndarray, lp: tuple | None) -> None:
    """A call's events to their requests, step by step (on the listener's thread)."""
    for i in range(out.shape[0]):
        _dispatch_step(snapshot, out[i], None if lp is None else tuple(a[i] for a in lp))


def _dispatch_step(snapshot: tuple, out: np.ndarray, lp: tuple | None) -> None:
    tokens, status = out[:, 0].tolist(), out[:, 1].tolist()
    for s in np.flatnonzero(out[:, 1]).tolist():
        entry = snapshot[s]
        if entry is None:
            continue
        h, c = entry
        code = status[s]
        if code != STOP:
            k = h.request.logprobs
            if k is None:
                h.emit(Token(c, tokens[s]))
            else:
                top = tuple(zip(lp[1][s, :k].tolist(), lp[2][s, :k].tolist()))
                h.emit(Token(c, tokens[s], float(lp[0][s]), top))
        if code >= LAST:
            h.emit(Finished(c, "stop" if code == STOP else "length"))


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
