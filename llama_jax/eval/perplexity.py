"""Perplexity of whole documents: rolling-window log-likelihood, each token predicted once.

Reported as lm-eval defines them for `loglikelihood_rolling` tasks, over the whole corpus
(sums, not a mean of per-document ratios):
  word_perplexity = exp(-sum LL / sum words), words = len(re.split(r"\\s+", doc));
  byte_perplexity = exp(-sum LL / sum UTF-8 bytes);
  bits_per_byte   = -sum LL / sum bytes / ln 2;
and token_perplexity = exp(-sum LL / sum tokens) for this model's tokenizer. A document is
predicted from BOS (its tokens do not include BOS); windows are the model's context with a
configurable stride (see `scoring.rolling_windows`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from llama_jax.eval.requests import Metric
from llama_jax.inference.scoring import Scorer, rolling_windows


def count_words(doc: str) -> int:
    return len(re.split(r"\s+", doc))


def perplexity_from_sums(loglik: float, tokens: int, words: int, nbytes: int) -> dict[str, float]:
    """The four perplexity figures from corpus sums."""
    return {
        "token_perplexity": math.exp(-loglik / max(tokens, 1)),
        "word_perplexity": math.exp(-loglik / max(words, 1)),
        "byte_perplexity": math.exp(-loglik / max(nbytes, 1)),
        "bits_per_byte": -loglik / max(nbytes, 1) / math.log(2),
    }


def evaluate_perplexity(
    scorer: Scorer,
    tokenizer: Any,
    documents: Sequence[str],
    task: str = "perplexity",
    stride: int | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[list[Metric], list[float]]:
    """Scores documents; returns the corpus metrics and each document's log-likelihood.

    Args:
      scorer: the model's `Scorer`.
      tokenizer: its tokenizer.
      documents: the texts (empty ones are skipped in the counts).
      task: name put on the metrics.
      stride: tokens predicted per window after the first (default: the whole window).
      progress: called with (windows done, windows in all).
    """
    docs = [d for d in documents if d]
    if not docs:
        raise ValueError(f"task {task!r} has no non-empty documents to score")
    ids = tokenizer.encode_batch(docs)
    windows, owner = [], []
    for d, toks in enumerate(ids):
        for w in rolling_windows(toks, tokenizer.bos_id, scorer.window, stride):
            windows.append(w)
            owner.append(d)
    total = len(windows)
    if progress is not None:  # the bar starts now: its rate counts compile and first batch
        progress(0, total)
    results = scorer.loglikelihood(
        windows, progress=None if progress is None else (lambda n: progress(n, total))
    )
    per_doc = [0.0] * len(docs)
    for d, r in zip(owner, results):
        per_doc[d] += r.logprob
    loglik = sum(per_doc)
    figures = perplexity_from_sums(
        loglik,
        sum(len(t) for t in ids),
        sum(count_words(d) for d in docs),
        sum(len(d.encode("utf-8")) for d in docs),
    )
    metrics = [Metric(task, k, v, None, len(docs)) for k, v in figures.items()]
    return metrics, per_doc
