"""Generation tasks: continue each prompt until a stop string, then score the text.

Generation runs on the `Sampler` (jitted prefill + decode loop, bucketed lengths), greedy by
default, many prompts per batch; a prompt longer than the window minus `max_new_tokens` loses
its oldest tokens (counted). Scores:
  exact_match, f1   question answering, after SQuAD's normalisation (lower case, no
                    punctuation or articles, single spaces); f1 over the answer's tokens,
                    best over the reference answers;
  bleu, chrf        translation, corpus-level through `sacrebleu` (BLEU with its `zh`
                    tokenizer when the references are Chinese, `13a` otherwise).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from llama_jax.eval.requests import Metric, encode_prompt, mean_stderr
from llama_jax.inference.sampler import SamplingParams
from llama_jax.inference.text_stream import generate_text


def generate_until(
    sampler: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[list[str], int]:
    """Continuations of text prompts (BOS prepended if the model's tokenizer adds it) or token
    prompts, cut before a stop string.

    Returns:
      (texts in prompt order, number of prompts truncated on the left to fit the window)
    """
    limit = sampler.config.max_seq_len
    if not 0 < max_new_tokens < limit:
        raise ValueError(f"max_new_tokens={max_new_tokens}; valid: 1 to {limit - 1}")
    ids = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    room = limit - max_new_tokens
    truncated = sum(len(p) > room for p in ids)
    stops = tokenizer.stop_ids if stop_ids is None else stop_ids
    # Similar lengths together: a batch pads to its longest prompt.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    if progress is not None:  # the bar starts now: its rate counts compile and first batch
        progress(0, len(order))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = generate_text(
            sampler,
            tokenizer,
            [ids[i][-room:] for i in chunk],
            max_new_tokens,
            sampling,
            seed,
            tuple(stop),
            stops,
            truncate=True,
        )
        for i, t in zip(chunk, texts):
            out[i] = t
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return out, truncated


# ----------------------------------------------------------------------------- QA scores
def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best SQuAD token F1 of `prediction` against any reference."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def qa_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], task: str
) -> list[Metric]:
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    n = len(predictions)
    return [
        Metric(task, "exact_match", *mean_stderr(em), n),
        Metric(task, "f1", *mean_stderr(f1), n),
    ]


# ----------------------------------------------------------------------------- translation
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def is_chinese(texts: Sequence[str]) -> bool:
    """Whether most of the texts contain CJK ideographs."""
    return sum(bool(_CJK.search(t)) for t in texts) * 2 > len(texts)


def translation_metrics(
    predictions: Sequence[str], references: Sequence[str], task: str
) -> list[Metric]:
    """Corpus BLEU and chrF (sacrebleu), BLEU tokenised for the target language."""
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError("BLEU / chrF need sacrebleu: pip install llama_jax[eval]") from e
    preds = [p.strip() for p in predictions]
    refs = [[r.strip() for r in references]]
    tokenize = "zh" if is_chinese(references) else "13a"
    n = len(preds)
    return [
        Metric(task, "bleu", sacrebleu.corpus_bleu(preds, refs, tokenize=tokenize).score, None, n),
        Metric(task, "chrf", sacrebleu.corpus_chrf(preds, refs).score, None, n),
    ]
