"""Log-likelihood scoring: (context, continuation) token requests, batched and bucketed.

This is the one engine every log-likelihood measurement goes through (`Llama3.score`, multiple
choice, classification, rolling perplexity, the lm-eval backend, the trainer's eval_tasks), in
float or int8 weights. It works on params + config + mesh (the trainer's live params or a
`LoadedModel`'s), never on a checkpoint.

How a request is scored (the same rules as lm-eval's `hf` backend):
  - the model sees `(context + continuation)[-(max_seq_len + 1):][:-1]`: a request longer than
    the window loses its oldest context tokens (counted in `Scorer.truncated`);
  - its value is the sum of log p(continuation token | everything before it), and `greedy` says
    whether every continuation token was the argmax.

Every process runs the same requests (each feeds its own devices' rows) and gets every
result back.

Batching: requests whose model input is the same sequence, or a prefix of another request's
input, share one row (a context with one-token choices, e.g. " positive" / " negative", is
scored once for all of them). Rows whose scored tokens all follow one common context of at
least MIN_SHARED tokens (multiple choice with multi-token choices) run that context once into
a KV cache and each choice on top of it (`_shared_fn`). Only the scored positions of a row
are projected to the vocabulary (the [D, V] matmul and the log-softmax are the expensive part
for Llama 3's 128k vocabulary). Rows are sorted by length and packed into batches whose
float32 logits stay under a byte budget; batch rows are padded to powers of two, row lengths
and scored positions per row to `length_bucket`s (2^k or 3 * 2^(k-1): at most a third is
padding), so a new request length reuses compiled code.

Per-token values (`token_logprobs`: each token's logprob given the ones before it, and the
top-k alternatives at each position; the serving engine's echo + logprobs) come from the same
jitted function, one sequence at a time, its positions split into passes whose logits fit the
budget. A Scorer made `from_sampler` runs the sampler's own decode-laid-out params through
`Sampler.apply` (the serving engine: no second copy of the weights).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.inference.sampler import batch_bucket, length_bucket
from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig
from llama_jax.model.quantize import as_qweights, check_quantize, int8_dense, quantize_params
from llama_jax.model.transformer import Transformer, init_cache

MIN_TARGETS = 8  # fewest scored positions per row: short requests share one compilation
MIN_SHARED = 16  # contexts at least this long, of several rows, run once for all of them
MIN_LENGTH = 16  # shortest row / context bucket
MIN_SUFFIX = 8  # shortest bucket of a row's part after its shared context (the choices)


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Per-token log-likelihood of one sequence of n ids.

    Attributes:
      logprobs: float32 [n - 1]: logprobs[i] = log p(ids[i + 1] | ids[:i + 1]).
      top_ids: int32 [n - 1, k]: the k most likely ids at each of those positions, most
        likely first (k = the `top_k` asked for).
      top_logprobs: float32 [n - 1, k]: their logprobs.
    """

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class LogLikelihood:
    """One request's result: summed log-probability and whether greedy decoding gives it."""

    logprob: float
    greedy: bool


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, window: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Splits a document into (context, continuation) requests that predict each token once.

    The first window predicts `tokens[:window]` from `prefix_id` (the model sees
    `[prefix_id] + tokens[:window - 1]`); each
    later one predicts the next `stride` tokens with as much preceding context as fits the
    window (lm-eval's `get_rolling_token_windows` + `make_disjoint_window` with
    `context_len = window - stride + 1`; the default stride = window gives lm-eval's own).

    Args:
      tokens: the document's ids (no BOS).
      prefix_id: the id the first token is predicted from (BOS).
      window: the model's context length.
      stride: tokens predicted per window after the first, in [1, window].

    Returns:
      (context ids, continuation ids) pairs; their continuations concatenate to `tokens`.
    """
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride}; valid: 1 to the window ({window})")
    tokens = list(tokens)
    if not tokens:
        return []
    out = []
    first = min(window, len(tokens))
    out.append(([prefix_id], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(stride, len(tokens) - done)
        end = done + n
        inp = tokens[max(0, end - 1 - window) : end - 1]  # window inputs ending before `end-1`
        # lm-eval's disjoint form: context = inputs before the predicted span.
        ctx = inp[: len(inp) - (n - 1)]
        out.append((ctx, tokens[done:end]))
        done = end
    return out


class Scorer:
    """Batched log-likelihood of token requests for one model on one mesh.

    Attributes:
      config, params, mesh: the model (params in the training layout, sharded over `mesh`).
      trace_counts: how often the scoring function was traced (= compiled); for tests.
      truncated: requests whose context was cut on the left to fit the window, so far.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        mesh: Mesh,
        *,
        max_batch_bytes: int = 1 << 29,
        max_batch_size: int = 64,
        quantize: str | None = None,
        apply: Callable[..., tuple[jax.Array, Any]] | None = None,
    ):
        """Args:
        config, params, mesh: the model.
        max_batch_bytes: rows per forward pass are limited so the float32 logits of a
          batch stay under this size.
        max_batch_size: at most this many rows per forward pass.
        quantize: "int8" scores with int8 projection weights (model/quantize.py), quantised
          once per params object, as generation does; None scores the params as given.
        apply: the model call `(params, tokens, positions, cache, logits_at) -> (float32
          logits, cache)` on `params` as given (`Sampler.apply` on its decode-laid-out
          params, see `from_sampler`); None: the Transformer of `config` on training-layout
          params (int8 per `quantize`).
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}; valid: an int >= 1")
        self.config, self.params, self.mesh = config, params, mesh
        self.max_batch_bytes, self.max_batch_size = int(max_batch_bytes), int(max_batch_size)
        self.batch_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self.truncated = 0
        self.window = config.max_seq_len  # tokens the model sees per request (at most)
        self.quantize = check_quantize(quantize)
        if apply is not None and self.quantize:
            raise ValueError("quantize applies to training-layout params; with apply=, give "
                             "params already quantized (as Sampler.apply takes them)")  # fmt: skip
        self._model = Transformer(config, int8_dense) if self.quantize else Transformer(config)
        self._apply = apply or self._model_apply
        self._quantized: tuple[Any, Any] = (None, None)  # (params, their int8 copy)
        self._jit = jax.jit(self._fn, static_argnames="top_k")
        self._shared_jit = jax.jit(self._shared_fn)

    @classmethod
    def from_sampler(cls, sampler: Any, **options: Any) -> Scorer:
        """A Scorer on a `Sampler`'s decode params and mesh, through `Sampler.apply` (the same
        model call generation makes, its vocabulary limit included); `options` as `__init__`'s
        max_batch_bytes / max_batch_size."""
        return cls(sampler.config, sampler.params, sampler.mesh, apply=sampler.apply, **options)

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            yield

    def _run_params(self) -> Any:
        """The params the model runs on: `params`, or their int8 copy (made once per object)."""
        if not self.quantize:
            return self.params
        if self._quantized[0] is not self.params:
            self._quantized = (None, None)  # let the old copy go first
            with self._context():
                self._quantized = (self.params, jax.jit(quantize_params)(self.params))
        return self._quantized[1]

    def _model_apply(self, params, tokens, positions, cache, logits_at):
        params = as_qweights(params) if self.quantize else params
        return self._model.apply(
            {"params": params}, tokens, positions, cache=cache, logits_at=logits_at
        )

    def _fn(self, params, tokens, pos, tok, *, top_k=0):
        """tokens [B, T]; pos, tok [B, X] -> (log p(tok at pos) [B, X], argmax == tok [B, X]),
        and with top_k > 0 the top_k (ids, logprobs) [B, X, top_k] at each position."""
        self.trace_counts["score"] += 1
        # Only the scored positions go through the [D, V] output projection.
        logits, _ = self._apply(params, tokens, None, None, pos)
        return _logprobs(logits, tok, top_k)

    def _shared_fn(self, params, prefix, suffix, start, owner, pos, tok):
        """Rows that share a context: the contexts run once into a KV cache, each row's suffix
        runs on its context's cache.

        Args:
          prefix: [P, Tp] contexts (right-padded); suffix: [R, Ts] the rest of each row,
          starting at position start [R] of context owner [R]; pos, tok: [R, X] scored
          positions (relative to the suffix) and tokens.
        """
        self.trace_counts["score_shared"] += 1
        p, tp = prefix.shape
        r, ts = suffix.shape
        cache = init_cache(self.config, p, tp + ts)
        positions = jnp.broadcast_to(jnp.arange(tp), (p, tp))
        _, cache = self._apply(params, prefix, positions, cache, jnp.zeros((p, 1), int))
        # Scanned caches are [L, B, K, S, H], per-layer ones [B, K, S, H] (model.init_cache).
        cache = jax.tree.map(lambda c: jnp.take(c, owner, axis=c.ndim - 4), cache)
        spos = start[:, None] + jnp.arange(ts)[None, :]
        # Slots from a context's padding are overwritten by the suffix before it attends.
        logits, _ = self._apply(params, suffix, spos, cache, pos)  # [R, X, V]
        return _logprobs(logits, tok, 0)

    def _put(self, x: np.ndarray) -> jax.Array:
        """A [B, ...] host array (the same on every process) with rows over the batch axes;
        each process supplies only its own devices' shards, so this works multi-host too."""
        spec = sharding.batch_sharding(self.mesh, x.ndim)
        return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])

    _fetch = staticmethod(sharding.to_host)

    def loglikelihood(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        progress: Callable[[int], Any] | None = None,
    ) -> list[LogLikelihood]:
        """Scores each (context ids, continuation ids) pair; results in request order.

        Args:
          requests: contexts of >= 1 id (e.g. BOS), continuations of 1..max_seq_len ids.
          progress: called with the number of requests finished after each batch.

        Returns:
          One `LogLikelihood` per request.
        """
        limit, v = self.window, self.config.vocab_size
        inputs, targets = [], []  # per request: model input, and its scored (pos, tok) pairs
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not ctx:
                raise ValueError(f"request {i} has an empty context; give at least BOS")
            if not cont:
                raise ValueError(f"request {i} has an empty continuation; nothing to score")
            if len(cont) > limit:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens is longer than the "
                    f"model's window ({limit} tokens)"
                )
            bad = [t for t in ctx + cont if not 0 <= t < v]
            if bad:
                raise ValueError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {v})")
            full = ctx + cont
            if len(full) > limit + 1:
                self.truncated += 1
                full = full[-(limit + 1) :]
            inp = tuple(full[:-1])
            n = len(inp)
            targets.append([(p, full[p + 1]) for p in range(n - len(cont), n)])
            inputs.append(inp)

        # Rows: distinct inputs; an input that is a prefix of another is scored in that row.
        # (Sorted, a prefix of any sequence is a prefix of its immediate successor.)
        distinct = sorted(set(inputs))
        host = list(range(len(distinct)))
        for j in range(len(distinct) - 2, -1, -1):
            a, b = distinct[j], distinct[j + 1]
            if len(a) <= len(b) and b[: len(a)] == a:
                host[j] = host[j + 1]
        row_of_input = {seq: host[j] for j, seq in enumerate(distinct)}
        rows = sorted(set(host), key=lambda r: len(distinct[r]))
        pairs: dict[int, dict[tuple[int, int], int]] = {r: {} for r in rows}
        for tg, inp in zip(targets, inputs):
            slots = pairs[row_of_input[inp]]
            for pair in tg:
                slots.setdefault(pair, len(slots))

        values: dict[tuple[int, int, int], tuple[float, bool]] = {}
        finished = 0
        waiting = collections.Counter(row_of_input[inp] for inp in inputs)
        # Rows whose scored positions all follow one common context (multiple choice with
        # multi-token choices): that context runs once, through a KV cache.
        first = {r: min(p for p, _ in pairs[r]) for r in rows}
        groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
        for r in rows:
            if first[r] >= MIN_SHARED:
                groups[distinct[r][: first[r]]].append(r)
        groups = {k: g for k, g in groups.items() if len(g) > 1}
        shared = {r for g in groups.values() for r in g}
        rows = [r for r in rows if r not in shared]
        for batch in self._shared_batches(list(groups.values()), distinct, pairs, first):
            self._run_shared(batch, distinct, pairs, first, values)
            finished += sum(waiting[r] for g in batch for r in g)
            if progress is not None:
                progress(finished)
        i = 0
        while i < len(rows):
            # Grow the batch while its float32 logits ([B, X, V], X scored positions per row)
            # fit the budget.
            chunk, t = [rows[i]], length_bucket(len(distinct[rows[i]]), limit)
            x = length_bucket(len(pairs[rows[i]]), 1 << 30, MIN_TARGETS)
            while i + len(chunk) < len(rows) and len(chunk) < self.max_batch_size:
                nxt = rows[i + len(chunk)]
                x_next = max(x, length_bucket(len(pairs[nxt]), 1 << 30, MIN_TARGETS))
                b_next = batch_bucket(len(chunk) + 1, self.batch_multiple)
                if b_next * x_next * v * 4 > self.max_batch_bytes:
                    break
                chunk.append(nxt)
                t, x = length_bucket(len(distinct[nxt]), limit), x_next
            b = batch_bucket(len(chunk), self.batch_multiple)
            tokens = np.zeros((b, t), np.int32)
            pos = np.zeros((b, x), np.int32)
            tok = np.zeros((b, x), np.int32)
            for k, r in enumerate(chunk):
                seq = distinct[r]
                tokens[k, : len(seq)] = seq
                for (p, target), slot in pairs[r].items():
                    pos[k, slot], tok[k, slot] = p, target
            with self._context():
                logp, hit = self._jit(
                    self._run_params(), self._put(tokens), self._put(pos), self._put(tok)
                )
            logp, hit = self._fetch(logp), self._fetch(hit)
            for k, r in enumerate(chunk):
                for (p, target), slot in pairs[r].items():
                    values[(r, p, target)] = (float(logp[k, slot]), bool(hit[k, slot]))
                finished += waiting[r]
            i += len(chunk)
            if progress is not None:
                progress(finished)

        out = []
        for tg, inp in zip(targets, inputs):
            r = row_of_input[inp]
            got = [values[(r, p, target)] for p, target in tg]
            # float64 on the host: a long document's sum keeps float32 per-token precision.
            out.append(
                LogLikelihood(
                    float(np.sum([g[0] for g in got], dtype=np.float64)), all(g[1] for g in got)
                )
            )
        return out

    def _shared_batches(self, groups, distinct, pairs, first):
        """Groups of rows (one context each; a group is never split) packed into batches
        whose logits fit the budget."""
        v = self.config.vocab_size
        batch, rows, x = [], 0, MIN_TARGETS
        for g in sorted(groups, key=lambda g: len(distinct[g[0]])):
            gx = max(length_bucket(len(pairs[r]), 1 << 30, MIN_TARGETS) for r in g)
            nx = max(x, gx) if batch else gx
            n = batch_bucket(rows + len(g), self.batch_multiple)
            too_big = n * nx * v * 4 > self.max_batch_bytes or rows + len(g) > self.max_batch_size
            if batch and too_big:
                yield batch
                batch, rows, nx = [], 0, gx
            batch.append(g)
            rows, x = rows + len(g), nx
        if batch:
            yield batch

    def _run_shared(self, batch, distinct, pairs, first, values) -> None:
        limit = self.window
        prefixes = [distinct[g[0]][: first[g[0]]] for g in batch]
        members = [(k, r) for k, g in enumerate(batch) for r in g]
        tp = length_bucket(max(len(q) for q in prefixes), limit)
        ts = length_bucket(max(len(distinct[r]) - first[r] for _, r in members), limit, MIN_SUFFIX)
        x = length_bucket(max(len(pairs[r]) for _, r in members), 1 << 30, MIN_TARGETS)
        np_, nr = (
            batch_bucket(len(prefixes), self.batch_multiple),
            batch_bucket(len(members), self.batch_multiple),
        )
        prefix = np.zeros((np_, tp), np.int32)
        for k, q in enumerate(prefixes):
            prefix[k, : len(q)] = q
        suffix = np.zeros((nr, ts), np.int32)
        start, owner = np.zeros((nr,), np.int32), np.zeros((nr,), np.int32)
        pos, tok = np.zeros((nr, x), np.int32), np.zeros((nr, x), np.int32)
        for j, (k, r) in enumerate(members):
            rest = distinct[r][first[r] :]
            suffix[j, : len(rest)] = rest
            start[j], owner[j] = first[r], k
            for (p, target), slot in pairs[r].items():
                pos[j, slot], tok[j, slot] = p - first[r], target
        with self._context():
            logp, hit = self._shared_jit(
                self._run_params(), self._put(prefix), self._put(suffix), self._put(start),
                self._put(owner), self._put(pos), self._put(tok),
            )  # fmt: skip
        logp, hit = self._fetch(logp), self._fetch(hit)
        for j, (_, r) in enumerate(members):
            for (p, target), slot in pairs[r].items():
                values[(r, p, target)] = (float(logp[j, slot]), bool(hit[j, slot]))

    def token_logprobs(self, ids: Sequence[int], top_k: int = 0) -> TokenLogprobs:
        """Each token's logprob given the ones before it, and the top_k alternatives there.

        One sequence, no truncation: its length is bucketed (`length_bucket`) and its scored
        positions run in passes of `token_width` positions (the whole forward pass each time,
        only those positions projected to the vocabulary), so the shapes depend on the bucket
        alone (`warm_token_logprobs` compiles them all).

        Args:
          ids: n >= 1 token ids, at most the window (`max_seq_len`) of them.
          top_k: alternatives per position, in [0, vocab_size].

        Returns:
          `TokenLogprobs` of n - 1 positions (none for a single id).
        """
        ids = [int(t) for t in ids]
        n, v = len(ids), self.config.vocab_size
        if not 1 <= n <= self.window:
            raise ValueError(f"{n} ids; valid: 1 to the model's window ({self.window})")
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {v})")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= v:
            raise ValueError(f"top_k={top_k!r}; valid: an int in [0, {v}]")
        t = length_bucket(n, self.window)
        width = self.token_width(t)
        b = batch_bucket(1, self.batch_multiple)
        tokens = np.zeros((b, t), np.int32)
        tokens[0, :n] = ids
        lps, top_ids, top_lps = [], [], []
        with self._context():
            dev = self._put(tokens)
            for start in range(0, n - 1, width):
                # Padding positions repeat the last one; their values are dropped.
                at = np.minimum(start + np.arange(width), n - 2)
                pos = np.zeros((b, width), np.int32)
                tok = np.zeros((b, width), np.int32)
                pos[0], tok[0] = at, np.asarray(ids)[at + 1]
                out = self._jit(
                    self._run_params(), dev, self._put(pos), self._put(tok), top_k=top_k
                )
                k = min(width, n - 1 - start)
                got = [self._fetch(a)[0, :k] for a in out]
                lps.append(got[0])
                top_ids.append(got[2] if top_k else np.zeros((k, 0), np.int32))
                top_lps.append(got[3] if top_k else np.zeros((k, 0), np.float32))
        if n == 1:
            return TokenLogprobs(
                np.zeros((0,), np.float32),
                np.zeros((0, top_k), np.int32),
                np.zeros((0, top_k), np.float32),
            )
        return TokenLogprobs(np.concatenate(lps), np.concatenate(top_ids), np.concatenate(top_lps))

    def token_width(self, t: int) -> int:
        """Positions per `token_logprobs` pass for a sequence bucket of t: all t, or the largest
        power of two whose float32 logits stay under max_batch_bytes."""
        b = batch_bucket(1, self.batch_multiple)
        w = max(1, min(t, self.max_batch_bytes // (b * self.config.vocab_size * 4)))
        return 1 << (w.bit_length() - 1) if w < t else t

    def warm_token_logprobs(self, max_len: int, top_k: int = 0) -> None:
        """Compiles every shape `token_logprobs(ids, top_k)` takes for 2..max_len ids."""
        buckets = sorted({length_bucket(n, self.window) for n in range(2, max_len + 1)})
        for t in buckets:
            self.token_logprobs([0] * t, top_k)

    def loglikelihood_rolling(
        self,
        documents: Sequence[Sequence[int]],
        prefix_id: int,
        stride: int | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> list[float]:
        """Log-likelihood of whole documents (each token predicted once; see `rolling_windows`).

        Args:
          documents: token ids of each document, without BOS (empty documents score 0.0).
          prefix_id: the id the first token is predicted from (BOS).
          stride: tokens predicted per window after the first (default: the window).
          progress: called with the number of windows finished after each batch.

        Returns:
          One float per document.
        """
        windows, owner = [], []
        for d, doc in enumerate(documents):
            for w in rolling_windows(doc, prefix_id, self.window, stride):
                windows.append(w)
                owner.append(d)
        totals = [0.0] * len(documents)
        if windows:
            for d, r in zip(owner, self.loglikelihood(windows, progress)):
                totals[d] += r.logprob
        return totals


def _logprobs(logits: jax.Array, tok: jax.Array, top_k: int) -> tuple[jax.Array, ...]:
    """logits [B, X, V], tok [B, X] -> (log p(tok) [B, X], argmax == tok [B, X]), and with
    top_k > 0 the top_k (ids int32, logprobs) [B, X, top_k]."""
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, X, 1]
    picked = jnp.take_along_axis(logits, tok[..., None], axis=-1)  # [B, X, 1]
    out = ((picked - lse)[..., 0], jnp.argmax(logits, axis=-1) == tok)
    if top_k:
        top, ids = jax.lax.top_k(logits, top_k)
        out += (ids.astype(jnp.int32), top - lse)
    return out
