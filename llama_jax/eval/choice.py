"""Multiple choice and classification: the answer is the choice the model finds most likely.

Every (context, choice) pair is scored by summed log-likelihood (`Scorer`, one batch for all
items; a context is run once for all its choices). As lm-eval's `multiple_choice`:
  acc       argmax of the log-likelihoods is the gold choice;
  acc_norm  argmax of log-likelihood / characters of the choice;
  acc_bytes argmax of log-likelihood / UTF-8 bytes of the choice.
Classification is multiple choice over label words (e.g. sentiment: " 正面" / " 负面"), with
macro F1 over the labels as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llama_jax.eval.requests import Metric, encode_pair, mean_stderr
from llama_jax.inference.scoring import Scorer


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One question: `context` followed by one of `choices`; `gold` indexes the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


def check_items(items: Sequence[ChoiceItem], task: str) -> None:
    """Raises ValueError naming the first malformed item."""
    if not items:
        raise ValueError(f"task {task!r} has no items")
    for i, it in enumerate(items):
        if len(it.choices) < 2:
            raise ValueError(f"task {task!r} item {i}: {len(it.choices)} choices; need >= 2")
        empty = [j for j, c in enumerate(it.choices) if not c]
        if empty:
            raise ValueError(f"task {task!r} item {i}: choice {empty[0]} is empty")
        if not 0 <= it.gold < len(it.choices):
            raise ValueError(
                f"task {task!r} item {i}: gold={it.gold}; valid: 0 to {len(it.choices) - 1}"
            )


def evaluate_choice(
    scorer: Scorer,
    tokenizer: Any,
    items: Sequence[ChoiceItem],
    task: str = "choice",
    macro_f1: bool = False,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[list[Metric], list[dict]]:
    """Scores every choice of every item; returns the metrics and one record per item.

    Records hold the log-likelihood of each choice and the three predictions.
    """
    check_items(items, task)
    requests, owner = [], []
    for i, it in enumerate(items):
        for c in it.choices:
            requests.append(encode_pair(tokenizer, it.context, c))
            owner.append(i)
    total = len(requests)
    if progress is not None:  # the bar starts now: its rate counts compile and first batch
        progress(0, total)
    results = scorer.loglikelihood(
        requests, progress=None if progress is None else (lambda n: progress(n, total))
    )
    lls: list[list[float]] = [[] for _ in items]
    for i, r in zip(owner, results):
        lls[i].append(r.logprob)
    records, acc, norm, byte = [], [], [], []
    for it, ll in zip(items, lls):
        ll = np.asarray(ll)
        chars = np.array([len(c) for c in it.choices], float)
        nbytes = np.array([len(c.encode("utf-8")) for c in it.choices], float)
        pred = int(np.argmax(ll))
        pred_norm, pred_bytes = int(np.argmax(ll / chars)), int(np.argmax(ll / nbytes))
        acc.append(float(pred == it.gold))
        norm.append(float(pred_norm == it.gold))
        byte.append(float(pred_bytes == it.gold))
        records.append(
            {
                "gold": it.gold,
                "loglikelihoods": ll.tolist(),
                "pred": pred,
                "pred_norm": pred_norm,
                "pred_bytes": pred_bytes,
            }
        )
    n = len(items)
    metrics = [
        Metric(task, name, *mean_stderr(v), n)
        for name, v in (("acc", acc), ("acc_norm", norm), ("acc_bytes", byte))
    ]
    if macro_f1:
        labels = sorted({it.gold for it in items} | {r["pred"] for r in records})
        f1s = []
        for lab in labels:
            tp = sum(r["pred"] == lab and r["gold"] == lab for r in records)
            fp = sum(r["pred"] == lab and r["gold"] != lab for r in records)
            fn = sum(r["pred"] != lab and r["gold"] == lab for r in records)
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        metrics.append(Metric(task, "macro_f1", float(np.mean(f1s)), None, n))
    return metrics, records
