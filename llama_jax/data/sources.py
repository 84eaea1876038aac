"""Where text comes from: `data_path` parsing and the document sources.

A `data_path` names a corpus:

- ``tfds:NAME[/CONFIG][:VERSION]`` -- any TensorFlow Datasets dataset, read through TFDS's
  random-access data sources (ArrayRecord), so TensorFlow itself is never imported. A dataset
  that is not prepared in `data_dir` is prepared there (as ArrayRecord) when `download=True`.
- ``shakespeare`` -- the built-in TFDS dataset of `llama_jax.data.shakespeare`.
- ``[file:]PATH`` -- a local file, directory (searched recursively) or glob of ``.txt`` (one
  document per file, per blank-line separated paragraph, or per line: `txt_mode`), ``.jsonl``
  (one JSON object per line, text in `text_field`) or ``.parquet`` (text in column `text_field`).
  Files are read in sorted path order; in a directory or glob, hidden files and files with
  other suffixes (README.md, ...) are ignored, and empty files are skipped with a warning.

A source yields its documents as `str` in a fixed order. Bytes that are not UTF-8 are replaced
by U+FFFD and counted (`Source.stats`), empty documents are skipped and counted; the caller
(`tokens.load_or_build`) reports both as warnings.

Local sources have one split, ``train``; hold documents out with TFDS-style slices such as
``train[:95%]`` / ``train[95%:]`` (or absolute document indices ``train[:1000]``), applied to
the documents in sorted-file order. TFDS splits accept whatever TFDS accepts.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

from llama_jax.data.tfds import tfds_builder

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_MODES = ("file", "blank_lines", "lines")

# "gs://x", "hf:name", "s3://b" ... (two characters at least, so "C:\\data" stays a path).
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):")
_TFDS = re.compile(
    r"^(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.+\-]+)?)(?::(?P<version>[0-9]+\.[0-9*]+\.[0-9*]+))?$"
)
_LOCAL_SPLIT = re.compile(
    r"^train(?:\[(?P<start>-?\d+(?:\.\d+)?%?)?:(?P<stop>-?\d+(?:\.\d+)?%?)?\])?$"
)


@dataclasses.dataclass(frozen=True)
class DataPath:
    """A parsed `data_path`.

    Attributes:
      scheme: "tfds", "shakespeare" or "files".
      name: the TFDS name, with "/CONFIG" when given ("tfds" only).
      version: the TFDS version, or None for the newest ("tfds" only).
      path: the local path or glob ("files" only).
    """

    scheme: str
    name: str = ""
    version: str | None = None
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "tfds":
            return f"tfds:{self.name}" + (f":{self.version}" if self.version else "")
        if self.scheme == "shakespeare":
            return "shakespeare"
        return self.path


def parse_data_path(data_path: str) -> DataPath:
    """Parses a `data_path` string (see the module docstring for the grammar).

    Raises:
      ValueError: for an empty string, a malformed ``tfds:`` name or an unknown scheme.
    """
    if not isinstance(data_path, str) or not data_path.strip():
        raise ValueError(
            f"data_path={data_path!r} is empty; expected 'tfds:NAME[/CONFIG][:VERSION]', "
            "'shakespeare', or a local .txt/.jsonl/.parquet file, directory or glob"
        )
    data_path = data_path.strip()
    if data_path == "shakespeare":
        return DataPath("shakespeare")
    if data_path.startswith("tfds:"):
        m = _TFDS.match(data_path[len("tfds:") :])
        if not m:
            raise ValueError(
                f"data_path={data_path!r} is not a valid TFDS name; expected "
                "'tfds:NAME', 'tfds:NAME/CONFIG', 'tfds:NAME:1.2.0' or 'tfds:NAME/CONFIG:1.2.0'"
            )
        return DataPath("tfds", name=m["name"], version=m["version"])
    if data_path.startswith("file:"):
        return DataPath("files", path=os.path.expanduser(data_path[len("file:") :]))
    m = _SCHEME.match(data_path)
    if m and not os.path.exists(data_path):
        raise ValueError(
            f"data_path={data_path!r} has unknown scheme {m['scheme']!r}; valid are "
            "'tfds:NAME[/CONFIG][:VERSION]', 'shakespeare', and local paths (optionally "
            "'file:PATH') to .txt/.jsonl/.parquet files, directories or globs"
        )
    return DataPath("files", path=os.path.expanduser(data_path))


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decodes UTF-8, replacing invalid sequences by U+FFFD.

    Returns:
      (text, number of invalid byte sequences replaced).
    """
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Each invalid sequence becomes one U+FFFD; genuine U+FFFD in the input were EF BF BD.
        return text, text.count("\ufffd") - data.count(b"\xef\xbf\xbd")


@dataclasses.dataclass
class SourceStats:
    """What a pass over a source found (filled while `Source.documents()` runs)."""

    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8: int = 0
    invalid_utf8_documents: int = 0


class Source(abc.ABC):
    """A corpus of text documents in a fixed order."""

    def __init__(self) -> None:
        self.stats = SourceStats()

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Names the source in messages."""

    @property
    @abc.abstractmethod
    def slug(self) -> str:
        """A short, filesystem-safe name for cache directories."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever the documents may have changed."""

    @abc.abstractmethod
    def _texts(self) -> Iterator[str | bytes | None]:
        """Yields raw document texts, in order."""

    def documents(self) -> Iterator[str]:
        """Yields the non-empty documents as `str`, counting what was replaced or skipped."""
        self.stats = SourceStats()
        for raw in self._texts():
            if raw is None:
                self.stats.empty_skipped += 1
                continue
            if isinstance(raw, bytes):
                text, bad = decode_utf8(raw)
                if bad:
                    self.stats.invalid_utf8 += bad
                    self.stats.invalid_utf8_documents += 1
            else:
                text = raw
            if not text.strip():
                self.stats.empty_skipped += 1
                continue
            self.stats.documents += 1
            yield text

    def select(self, num_documents: int) -> tuple[int, int]:
        """The [start, stop) range of documents (of `num_documents`) that the split selects."""
        return 0, num_documents


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "data"


# -- local files -------------------------------------------------------------------------------


def _resolve_files(path: str) -> list[str]:
    """The sorted list of supported files a path, directory or glob names."""
    if any(c in path for c in "*?["):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"data_path glob {path!r} matches no files")
    elif os.path.isdir(path):
        matches = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git, .cache, ...
            matches += [os.path.join(root, f) for f in files if not f.startswith(".")]
        matches.sort()
        if not matches:
            raise FileNotFoundError(f"data_path directory {path!r} holds no files")
    elif os.path.isfile(path):
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise ValueError(
                f"data_path file {path!r} has an unsupported suffix; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [os.path.abspath(path)]
    else:
        raise FileNotFoundError(
            f"data_path {path!r} does not exist; expected a .txt/.jsonl/.parquet file, a "
            "directory or a glob (or 'tfds:NAME' / 'shakespeare')"
        )
    files = [os.path.abspath(p) for p in matches if p.endswith(SUPPORTED_SUFFIXES)]
    if not files:
        raise FileNotFoundError(
            f"data_path {path!r} matches {len(matches)} file(s) but none ends in "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    return files


@dataclasses.dataclass(frozen=True)
class _Slice:
    start: str | None
    stop: str | None

    def resolve(self, n: int) -> tuple[int, int]:
        def bound(b: str | None, default: int) -> int:
            if b is None:
                return default
            if b.endswith("%"):
                value = int(n * float(b[:-1]) / 100)
            elif "." in b:
                raise ValueError(f"slice bound {b!r}: a fraction needs a '%'")
            else:
                value = int(b)
            if value < 0:
                value += n
            return min(max(value, 0), n)

        return bound(self.start, 0), bound(self.stop, n)


class FilesSource(Source):
    """Local ``.txt`` / ``.jsonl`` / ``.parquet`` files (see the module docstring)."""

    def __init__(
        self, path: str, *, split: str = "train", text_field: str = "text", txt_mode: str = "file"
    ) -> None:
        super().__init__()
        if txt_mode not in TXT_MODES:
            raise ValueError(f"txt_mode={txt_mode!r} is not one of {TXT_MODES}")
        m = _LOCAL_SPLIT.match(split)
        if not m:
            raise ValueError(
                f"split={split!r} does not exist for local data_path {path!r}: local files form "
                "one split, 'train'; hold documents out with slices like 'train[:95%]' and "
                "'train[95%:]' or 'train[:1000]'"
            )
        self._slice = _Slice(m["start"], m["stop"])
        self.path = path
        self.split = split
        self.text_field = text_field
        self.txt_mode = txt_mode
        self.files = _resolve_files(path)
        self._check_files()

    def _check_files(self) -> None:
        # Cheap checks before any reading or tokenising.
        sizes = {f: os.path.getsize(f) for f in self.files}
        empty = [f for f, s in sizes.items() if s == 0]
        if len(empty) == len(self.files):
            raise ValueError(
                f"data_path {self.path!r}: every file is empty ({', '.join(empty[:5])}"
                + (", ..." if len(empty) > 5 else "")
                + ")"
            )
        if empty:
            warnings.warn(
                f"data_path {self.path!r}: skipping {len(empty)} empty file(s): "
                + ", ".join(empty[:5])
                + (", ..." if len(empty) > 5 else ""),
                stacklevel=3,
            )
            self.files = [f for f in self.files if sizes[f] > 0]
        for f in self.files:
            if f.endswith(".parquet"):
                import pyarrow.parquet as pq

                names = pq.read_schema(f).names
                if self.text_field not in names:
                    raise ValueError(
                        f"{f}: parquet file has no column {self.text_field!r} (columns: "
                        f"{names}); set text_field= to the text column"
                    )
        self._stat = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]

    @property
    def description(self) -> str:
        return f"data_path {self.path!r}"

    @property
    def slug(self) -> str:
        return _slug(os.path.basename(self.path.rstrip("/*")) or "files")

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "files",
            "files": self._stat,
            "text_field": self.text_field,
            "txt_mode": self.txt_mode,
        }

    def select(self, num_documents: int) -> tuple[int, int]:
        return self._slice.resolve(num_documents)

    @property
    def is_sliced(self) -> bool:
        return self.split != "train"

    def token_range(self, num_tokens: int) -> tuple[int, int]:
        """The split applied to the tokens of a corpus that is a single document."""
        return self._slice.resolve(num_tokens)

    def _texts(self) -> Iterator[str | bytes | None]:
        for f in self.files:
            if f.endswith(".txt"):
                yield from self._txt(f)
            elif f.endswith(".jsonl"):
                yield from self._jsonl(f)
            else:
                yield from self._parquet(f)

    def _txt(self, f: str) -> Iterator[str | bytes | None]:
        with open(f, "rb") as fh:
            data = fh.read()
        if self.txt_mode == "file":
            yield data
            return
        text, bad = decode_utf8(data)
        if bad:
            self.stats.invalid_utf8 += bad
            self.stats.invalid_utf8_documents += 1
        text = text.replace("\r\n", "\n")
        if self.txt_mode == "lines":
            for line in text.split("\n"):
                if line.strip():
                    yield line
            return
        for para in re.split(r"\n[ \t\r\f\v]*\n", text):
            if para.strip():
                yield para.strip("\n")

    def _jsonl(self, f: str) -> Iterator[str | bytes | None]:
        field = self.text_field
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                text, bad = decode_utf8(line)
                if bad:
                    self.stats.invalid_utf8 += bad
                    self.stats.invalid_utf8_documents += 1
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: line is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{f}:{lineno}: expected a JSON object, got {type(record).__name__}"
                    )
                if field not in record:
                    raise ValueError(
                        f"{f}:{lineno}: record has no field {field!r} (fields: "
                        f"{sorted(record)}); set text_field= to the text field"
                    )
                value = record[field]
                if value is None:
                    yield None
                elif not isinstance(value, str):
                    raise ValueError(
                        f"{f}:{lineno}: field {field!r} is a {type(value).__name__}, "
                        "expected a string"
                    )
                else:
                    yield value

    def _parquet(self, f: str) -> Iterator[str | bytes | None]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None and not isinstance(value, (str, bytes)):
                    raise ValueError(
                        f"{f}: column {self.text_field!r} holds {type(value).__name__}, "
                        "expected strings"
                    )
                yield value


# -- TFDS --------------------------------------------------------------------------------------


class TfdsSource(Source):
    """A TFDS split read through `builder.as_data_source` (ArrayRecord; no TensorFlow)."""

    def __init__(self, builder: Any, *, split: str, text_field: str = "text") -> None:
        super().__init__()
        self.builder = builder
        self.split = split
        self.text_field = text_field
        info = builder.info
        features = dict(info.features.items()) if info.features is not None else {}
        if text_field not in features:
            texts = [k for k, v in features.items() if type(v).__name__ == "Text"]
            raise ValueError(
                f"TFDS dataset {info.full_name!r} has no feature {text_field!r}; its text "
                f"features are {texts} (all features: {sorted(features)}); set text_field="
            )
        # "train", "train[:10%]", "train[:5%]+validation": TFDS resolves the selection.
        try:
            num_examples = info.splits[split].num_examples
        except Exception as e:  # ValueError/KeyError/AssertionError, by TFDS version and case
            raise ValueError(
                f"split={split!r} does not exist in TFDS dataset {info.full_name!r} "
                f"(splits: {sorted(info.splits)}; slices like 'train[:90%]' work too): {e}"
            ) from None
        if num_examples == 0:
            raise ValueError(f"split={split!r} of TFDS dataset {info.full_name!r} is empty")
        try:
            self._ds = builder.as_data_source(split=split)
        except Exception as e:  # e.g. a copy prepared as TFRecord, or a malformed slice
            raise ValueError(
                f"cannot read split={split!r} of TFDS dataset {info.full_name!r} in "
                f"{builder.data_dir} with random access: {e}"
            ) from None

    @property
    def description(self) -> str:
        return f"TFDS {self.builder.info.full_name} split {self.split!r}"

    @property
    def slug(self) -> str:
        return _slug(f"{self.builder.info.full_name.split('/')[0]}-{self.split}")

    def identity(self) -> dict[str, Any]:
        info = self.builder.info
        splits = {
            name: [int(s.num_examples), int(s.num_bytes)] for name, s in sorted(info.splits.items())
        }
        return {
            "kind": "tfds",
            "full_name": info.full_name,
            "split": self.split,
            "text_field": self.text_field,
            "num_examples": len(self._ds),
            "splits": splits,
        }

    def _texts(self) -> Iterator[str | bytes | None]:
        n = len(self._ds)
        step = 256
        for start in range(0, n, step):
            for record in self._ds.__getitems__(list(range(start, min(start + step, n)))):
                value = record[self.text_field]
                if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
                    value = value.item()  # numpy scalar of bytes
                if not isinstance(value, (str, bytes)) and value is not None:
                    raise ValueError(
                        f"{self.description}: feature {self.text_field!r} holds "
                        f"{type(value).__name__}, expected text"
                    )
                yield value


def open_source(
    data_path: str | DataPath,
    *,
    split: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    text_field: str = "text",
    txt_mode: str = "file",
) -> Source:
    """Opens the source a `data_path` names (cheap checks only; no document is read).

    Args:
      data_path: see the module docstring.
      split: the split ("train", "validation", TFDS slices such as "train[:5%]").
      data_dir: TFDS data dir (default: TFDS's, e.g. ~/tensorflow_datasets).
      manual_dir: a directory holding manually downloaded archives (TFDS `manual_dir`).
      download: prepare a TFDS dataset that is not prepared yet.
      text_field: the JSON field, parquet column or TFDS feature holding the text.
      txt_mode: "file" (one document per .txt file), "blank_lines" (split on blank lines) or
        "lines" (one document per non-empty line).
    """
    dp = parse_data_path(data_path) if isinstance(data_path, str) else data_path
    if dp.scheme == "files":
        return FilesSource(dp.path, split=split, text_field=text_field, txt_mode=txt_mode)
    if dp.scheme == "shakespeare":
        # deferred: the builder module imports tensorflow_datasets, seconds at startup
        from llama_jax.data import shakespeare

        builder = shakespeare.prepare(data_dir=data_dir, manual_dir=manual_dir, download=download)
        return TfdsSource(builder, split=split, text_field="text")
    builder = tfds_builder(
        dp.name, dp.version, data_dir=data_dir, download=download, manual_dir=manual_dir
    )
    return TfdsSource(builder, split=split, text_field=text_field)


__all__ = [
    "DataPath",
    "FilesSource",
    "Source",
    "SourceStats",
    "SUPPORTED_SUFFIXES",
    "TXT_MODES",
    "TfdsSource",
    "decode_utf8",
    "open_source",
    "parse_data_path",
    "tfds_builder",
]
