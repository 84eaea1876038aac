"""What the engine is asked and what it answers: requests, their events, and handles.

Request          one prompt, how to continue it, and `n` choices (each its own slot).
Token, Finished, PromptLogprobs   the events a request's callback receives.
Handle           a submitted request: cancel it, see whether it is done.
check_request    validation, naming the first bad field.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from llama_jax.inference.sampler import SamplingParams

log = logging.getLogger("llama_jax.serve.engine")

TOP_LOGPROBS = 20  # most alternatives a token's logprobs can list (OpenAI's chat limit)
STOP_SLOTS = 8  # stop ids per request (the tokenizer's end tokens: 1-3 for Llama 3)


@dataclasses.dataclass
class Request:
    """One prompt to continue.

    Attributes:
      prompt: token ids, used as given (text prompts carry their BOS already).
      max_tokens: new tokens per choice (0: only `prompt_logprobs`).
      sampling: token choice; greedy when temperature is 0.
      seed: PRNG seed in [0, 2**32).
      n: independent choices; choice i equals row i of an offline batch of n copies.
      stop_ids: a choice ends at the first of these (not emitted); at most STOP_SLOTS.
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
    """A submitted request: `cancel()` ends it (or one choice of it) and frees its slots.

    `finished[c]` is the engine's view (set on the engine thread when choice c ends);
    `closed[c]` is the listener's (set where events are delivered, once `Finished` went out):
    tokens the device produced after a cancel are never delivered after the `Finished`.
    """

    def __init__(self, engine: Any, request: Request, on_event: Callable[[Any], None]):
        self._engine = engine
        self.request = request
        self.on_event = on_event
        self.cancelled = [False] * request.n
        self.finished = [False] * request.n
        self.closed = [False] * request.n
        self.slots: list[int | None] = [None] * request.n

    def cancel(self, choice: int | None = None) -> None:
        """Stops one choice, or all of them; thread-safe, and a no-op once finished."""
        for c in range(self.request.n) if choice is None else (choice,):
            self.cancelled[c] = True
        self._engine._withdraw(self)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def emit(self, event: Any) -> None:
        """Delivers `event` (on the listener's thread); a broken listener cancels its request."""
        if isinstance(event, (Token, Finished)):
            if self.closed[event.choice]:
                return
            if isinstance(event, Finished):
                self.closed[event.choice] = True
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
            log.exception("request callback failed; cancelling the request")
            self.cancel()


def check_request(r: Request, vocab_size: int, max_seq_len: int, max_batch: int) -> None:
    """Raises ValueError naming the first bad field of `r`."""
    if not isinstance(r.sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(r.sampling).__name__}")
    n = len(r.prompt)
    if n == 0:
        raise ValueError("the prompt is empty; it needs at least one token")
    bad = [t for t in r.prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 0:
        raise ValueError(f"max_tokens={r.max_tokens!r}; valid: an int >= 0")
    if r.max_tokens == 0 and not r.prompt_logprobs:
        raise ValueError("max_tokens=0; valid: >= 1 (0 only to score the prompt, with echo)")
    if n + r.max_tokens > max_seq_len:
        raise ValueError(
            f"the prompt has {n} tokens and max_tokens={r.max_tokens}: together more than "
            f"the server's context of {max_seq_len} tokens; shorten the prompt or lower max_tokens"
        )
    if isinstance(r.n, bool) or not isinstance(r.n, int) or not 1 <= r.n <= max_batch:
        raise ValueError(f"n={r.n!r}; valid: an int in [1, {max_batch}] (the slots)")
    if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed < 2**32:
        raise ValueError(f"seed={r.seed!r}; valid: an int in [0, 2**32)")
    lp = r.logprobs
    if lp is not None and (
        isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= TOP_LOGPROBS
    ):
        raise ValueError(f"logprobs={lp!r}; valid: an int in [0, {TOP_LOGPROBS}]")
    stops = list(r.stop_ids)
    if len(stops) > STOP_SLOTS or not all(0 <= int(t) < vocab_size for t in stops):
        raise ValueError(
            f"stop_ids={sorted(stops)}; valid: at most {STOP_SLOTS} ids in [0, {vocab_size})"
        )
