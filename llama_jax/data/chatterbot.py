"""The `chatterbot` chat corpus: `chatterbot/en` (~2,000 dialogs) and `chatterbot/zh` (~470).

The conversations come from the wheel of the PyPI package ``chatterbot-corpus==1.3.3`` (BSD
licence, 346 kB): ``chatterbot_corpus/data/<language>/*.yml``, one YAML file per topic, each a
list of conversations, a conversation a list of lines said in turn. The first line is the
user's, the next the assistant's, and so on; a dialog that ends on a user line loses that line
(nothing answers it). The archive is taken from `download_dir` when it is there, else fetched
once with ``python -m pip download --no-deps chatterbot-corpus==1.3.3`` into it, and its sha256
is checked either way.

Splits: every 20th conversation (in file-name order, then file order) is `validation`, the
rest is `train` -- a fixed, deterministic choice spread over all topics.
"""

from __future__ import annotations

import zipfile

import yaml

from llama_jax.data.archive import fetch_archive

ARCHIVE_NAME = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
ARCHIVE_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
PIP_REQUIREMENT = "chatterbot-corpus==1.3.3"
LANGUAGES = {"en": "english", "zh": "chinese"}
SPLITS = ("train", "validation")
VALIDATION_EVERY = 20


def find_or_fetch_archive(download_dir: str | None = None) -> str:
    """The checked archive in `download_dir` (default: the archive cache), fetched once."""
    return fetch_archive(
        PIP_REQUIREMENT, ARCHIVE_NAME, ARCHIVE_SHA256, sdist=False, directory=download_dir
    )


def dialogs(language: str, split: str, download_dir: str | None = None) -> list[list[dict]]:
    """The conversations of `language` ("en" or "zh") in `split`, as chat messages.

    Returns:
      One list of {"role", "content"} dicts per conversation (user first, ending on an
      assistant turn); conversations with no assistant turn are left out.
    """
    if language not in LANGUAGES:
        raise ValueError(
            f"chatterbot language {language!r}; valid: {', '.join(LANGUAGES)} "
            "(data_path chatterbot/en or chatterbot/zh)"
        )
    if split not in SPLITS:
        raise ValueError(f"chatterbot split {split!r}; valid: {', '.join(SPLITS)}")
    archive = find_or_fetch_archive(download_dir)
    prefix = f"chatterbot_corpus/data/{LANGUAGES[language]}/"
    out, k = [], 0
    with zipfile.ZipFile(archive) as z:
        for name in sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".yml")):
            data = yaml.safe_load(z.read(name)) or {}
            for conv in data.get("conversations") or []:
                lines = [str(x).strip() for x in conv if x is not None]
                lines = lines[: len(lines) // 2 * 2]  # a final user line has no answer
                held_out = k % VALIDATION_EVERY == 0
                k += 1
                if not lines or held_out != (split == "validation"):
                    continue
                roles = ("user", "assistant")
                out.append([{"role": roles[i % 2], "content": t} for i, t in enumerate(lines)])
    return out
