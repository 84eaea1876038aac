"""Text -> token requests, the way lm-eval's `TemplateLM` builds them, and result records.

Shared by the measurement modules (perplexity, choice, generation) so that a built-in task and
the same task run through lm-eval's `hf` backend see the same tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from llama_jax.tokenizer.base import adds_bos


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A text prompt's ids (BOS first if `adds_bos`; special-token text as the token)."""
    return tokenizer.encode(text, bos=adds_bos(tokenizer), allowed_special="all")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a request, as lm-eval splits them.

    BOS is prepended to the context if the model's tokenizer adds it (`adds_bos`); trailing
    spaces of the context move to the continuation;
    the continuation's ids are those of `context + continuation` after the context's ids (so a
    word boundary is tokenised as in running text). An empty context is just BOS.
    """
    if not continuation:
        raise ValueError(f"empty continuation for context {context[-40:]!r}; nothing to score")
    if context == "":
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    bos = adds_bos(tokenizer)
    whole = tokenizer.encode(context + continuation, bos=bos)
    ctx = tokenizer.encode(context, bos=bos)
    return ctx, whole[len(ctx) :]


@dataclasses.dataclass
class Metric:
    """One number of a task's result (`stderr` None where it is not a mean over items)."""

    task: str
    name: str
    value: float
    stderr: float | None
    n: int


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample std / sqrt(n), as lm-eval's `mean_stderr`)."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
