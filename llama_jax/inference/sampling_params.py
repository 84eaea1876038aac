"""Sampling parameters and the per-row draw, plus the bucket sizes the sampler compiles for.

SamplingParams   temperature / top-k / top-p / min-p (traced as scalars so new values never
                 recompile), and max_new_tokens / seed / stop / truncate for `Llama3`; validated.
sample_tokens    greedy, or a seeded draw from the filtered distribution, for [B, V].
_step_keys       row r's key at step s: fold_in(fold_in(key(seed), r), s).
bucket, batch_bucket   cache / batch lengths rounded to powers of two.
length_bucket          prompt / row lengths rounded to 2^k or 3 * 2^(k-1) (a third padding at most).
check_prompts          token prompts (and max_new_tokens, seed) validated against the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import ModelConfig

Array = jax.Array

MIN_BUCKET = 16  # shortest prompt / cache bucket: tiny prompts share one compilation


# ----------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How text is generated: the token choice, and (for `Llama3` calls) how much and when to stop.

    One object, so `Llama3.generate`, `generate_ids`, `stream` and `chat` take the same
    settings (keywords given to those methods replace fields of it). The jitted engine reads the
    token-choice fields only, as traced scalars, so new values never recompile.

    Attributes:
      temperature: 0 is greedy (argmax); > 0 divides the logits before sampling.
      top_k: keep the k most likely tokens (0: no limit).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p,
        measured after top-k (1: no limit).
      min_p: keep tokens whose probability is at least min_p times the most likely one's (0: no
        limit). Filters apply in the order top-k, top-p, min-p, as in Hugging Face.
      max_new_tokens: at most this many new tokens per prompt.
      seed: PRNG seed; the same seed and settings give the same tokens.
      stop: strings that end a prompt's text (not included); a str or a sequence of them.
      truncate: drop the oldest prompt tokens that would not fit the model's context, instead
        of raising.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()
    truncate: bool = False

    def __post_init__(self):
        t, k, p, m = self.temperature, self.top_k, self.top_p, self.min_p

        def number(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not number(t) or t < 0:
            raise ValueError(f"temperature={t!r}; valid: a finite number >= 0 (0 is greedy)")
        if not integer(k) or k < 0:
            raise ValueError(f"top_k={k!r}; valid: an int >= 0 (0 keeps every token)")
        if not number(p) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r}; valid: a number in (0, 1] (1 keeps every token)")
        if not number(m) or not 0 <= m < 1:
            raise ValueError(f"min_p={m!r}; valid: a number in [0, 1) (0 keeps every token)")
        if not integer(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}; valid: an int in [0, 2**32)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strs, got {s!r}")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.truncate, bool):
            raise ValueError(f"truncate={self.truncate!r}; valid: True or False")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied; ValueError naming an unknown field and the valid ones."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown sampling setting(s) {', '.join(unknown)}; valid: {', '.join(fields)}"
            )
        return dataclasses.replace(self, **changes)

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
    keep = jnp.ones(x.shape, bool)
    if needs_sort:
        v = x.shape[-1]
        ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), x.shape)
        # Descending by logit; a stable sort keeps the lower token id first among ties.
        neg_sorted, ids = jax.lax.sort((-x, ids), dimension=-1, num_keys=1, is_stable=True)
        xs = -neg_sorted  # [B, V], xs[:, 0] is the most likely token
        rank = jnp.arange(v)
        kept = (top_k <= 0) | (rank < top_k)
        probs = jax.nn.softmax(jnp.where(kept, xs, neg_inf), axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the smallest set
        # reaching top_p. top_p == 1 keeps all (float cumsums can round to 1 early).
        before = jnp.cumsum(probs, axis=-1) - probs
        kept &= (before < top_p) | (top_p >= 1)
        # Back to vocabulary order, and draw there: the token drawn then depends on the
        # logits' values, not on how near-equal ones happened to sort, so rounding-level
        # differences (another batch size, another kernel) cannot swap it for a neighbour.
        keep = jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None], ids].set(kept)
    probs = jax.nn.softmax(jnp.where(keep, x, neg_inf), axis=-1)
    keep &= probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, x, neg_inf))
    return choice.astype(jnp.int32)


def _step_keys(seed: Array, rows: Array, step: Array) -> Array:
    """[B] keys for `step`: depend on (seed, row, step) only."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)


# ----------------------------------------------------------------------------- buckets
def bucket(n: int, limit: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum), but at most `limit` (which must be >= n)."""
    return min(limit, max(minimum, 1 << max(0, n - 1).bit_length()))


def length_bucket(n: int, limit: int, minimum: int = MIN_BUCKET) -> int:
    """The padded size of n: the smallest 2^k or 3 * 2^(k-1) >= max(n, minimum), at most
    `limit`. A third of a bucket at most is padding (powers of two alone: up to half), for
    about twice as many compiled shapes: prompts, whose prefill is compute-bound, use these."""
    n = max(n, minimum)
    p = 1 << max(0, n - 1).bit_length()
    if p >= 4 and 3 * p // 4 >= n:
        p = 3 * p // 4
    return min(limit, p)


def batch_bucket(n: int, multiple: int) -> int:
    """Rows a batch of n prompts is padded to: a power of two, and a multiple of the mesh's
    batch axes (data * fsdp) so the cache can be split over them."""
    b = 1 << max(0, n - 1).bit_length()
    return -(-b // multiple) * multiple


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
                    + f" or truncate it (truncate=True; --truncate in the CLI) to keep its last "
                    f"{room} tokens"
                )
            ids = ids[len(ids) - room :]
        out.append(ids)
    return out


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}; valid: an int in [0, 2**32)")
    return int(seed)
