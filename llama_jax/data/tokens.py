"""Tokenise once: the tokenizer interface the data pipeline needs, and the on-disk token cache.

A corpus is tokenised (in parallel chunks through `Tokenizer.encode_batch`, without BOS/EOS:
the packer adds those, so changing them never re-tokenises) and cached as

    CACHE_DIR/<slug>-<key>/tokens.npy    [num_tokens] uint16 (vocab <= 65536) or uint32
                         /offsets.npy   [num_documents + 1] int64; document i is
                                        tokens[offsets[i]:offsets[i + 1]]
                         /meta.json     what was tokenised, by which tokenizer, and counts

keyed by the source's identity (TFDS name/version/split, or file paths/sizes/mtimes), the
tokenizer's fingerprint and this format's version. The entry is written to a temporary
directory in CACHE_DIR and renamed into place, so a reader never sees a partial cache and
processes racing to build the same entry are harmless (the first rename wins). The second run,
and every epoch, memory-maps the arrays: each host only pages in the rows it reads.

In a multi-host job every host builds the entry it lacks (deterministically identical); point
`cache_dir` at a shared filesystem to build it once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from llama_jax.data.sources import Source

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "llama_jax", "tokens")

log = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (`llama_jax.tokenizer` provides it).

    A tokenizer must also have an identity for the cache key: a `fingerprint` string
    attribute, or a `path` to its model file (whose contents are hashed).
    """

    bos_id: int
    eos_id: int
    pad_id: int | None  # None: padding uses eos_id (padding is marked by segment_ids == 0)
    vocab_size: int

    def encode_batch(
        self, texts: list[str], *, bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Token ids of each text."""
        ...


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A string that changes whenever the tokenizer's output may change.

    Raises:
      ValueError: the tokenizer has neither `fingerprint` nor a readable `path`.
    """
    fp = getattr(tokenizer, "fingerprint", None)
    if fp:
        return str(fp)
    path = getattr(tokenizer, "path", None)
    if path and os.path.isfile(os.fspath(path)):
        h = hashlib.sha256(type(tokenizer).__qualname__.encode())
        with open(os.fspath(path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no identity for the token cache: give it a "
        "`fingerprint` string attribute or a `path` to its model file"
    )


def check_tokenizer(tokenizer: Any) -> None:
    """Raises a clear error when `tokenizer` lacks what the pipeline uses."""
    missing = [
        a
        for a in ("encode_batch", "bos_id", "eos_id", "pad_id", "vocab_size")
        if not hasattr(tokenizer, a)
    ]
    if missing:
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} lacks {missing}; see "
            "llama_jax.data.Tokenizer for the interface"
        )


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """A tokenised source, memory-mapped from the cache.

    Attributes:
      tokens: [num_tokens] uint16/uint32, all documents concatenated (no BOS/EOS).
      offsets: [num_documents + 1] int64 document boundaries into `tokens`.
      meta: the entry's meta.json (source identity, tokenizer fingerprint, counts, content hash).
      path: the cache entry directory.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict[str, Any]
    path: str

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def content_hash(self) -> str:
        """sha256 of the token ids and offsets: the corpus identity a resumed run checks."""
        return self.meta["content_sha256"]


def cache_key(source: Source, tokenizer: Any) -> str:
    """The cache entry name for `source` tokenised by `tokenizer`."""
    ident = {
        "format": CACHE_FORMAT,
        "source": source.identity(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return f"{source.slug}-{digest[:20]}"


def _load(path: str) -> TokenizedCorpus:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    tokens = np.load(
        os.path.join(path, "tokens.npy"), mmap_mode="r" if meta["num_tokens"] else None
    )
    offsets = np.load(os.path.join(path, "offsets.npy"))
    return TokenizedCorpus(tokens=tokens, offsets=offsets, meta=meta, path=path)


def _chunks(it: Iterator[str], max_chars: int, max_docs: int) -> Iterator[list[str]]:
    """Groups documents into chunks of about `max_chars` characters (or `max_docs` documents)."""
    chunk: list[str] = []
    size = 0
    for doc in it:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars or len(chunk) >= max_docs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoder(tokenizer: Any, num_workers: int | None) -> tuple[Callable[[list[str]], Any], int]:
    """(encode function for one chunk, number of chunks encoded concurrently)."""
    cpus = os.cpu_count() or 1
    try:
        params = inspect.signature(tokenizer.encode_batch).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_threads" in params:
        # llama_jax.tokenizer parallelises each call itself: overlap two calls (so reading and
        # encoding overlap) and split the cores between them rather than oversubscribing.
        workers = num_workers or 2
        inner = max(1, cpus // workers)
        return (
            lambda texts: tokenizer.encode_batch(texts, bos=False, eos=False, num_threads=inner),
            workers,
        )
    return lambda texts: tokenizer.encode_batch(texts, bos=False, eos=False), num_workers or cpus


def _tmp_prefix(key: str) -> str:
    return f".tmp-{key}-{socket.gethostname()}-"


def _remove_stale_builds(cache_dir: str, key: str) -> None:
    """Deletes what killed builds of `key` on this host left (their process is gone); builds
    that are still running, or on other hosts sharing the directory, are left alone."""
    prefix = _tmp_prefix(key)
    for name in os.listdir(cache_dir):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_or_build(
    source: Source,
    tokenizer: Any,
    *,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    chunk_chars: int = 1 << 20,
) -> TokenizedCorpus:
    """Returns the tokenised `source`, from the cache or by tokenising it once.

    Args:
      source: the documents.
      tokenizer: see `Tokenizer`.
      cache_dir: where entries live (default ~/.cache/llama_jax/tokens).
      num_workers: `encode_batch` calls in flight (default: the CPU count, or 2 for a
        tokenizer whose `encode_batch` takes `num_threads` and so parallelises itself). Native
        tokenizers (tiktoken, sentencepiece, tokenizers) release the GIL, so this scales.
      chunk_chars: about this many characters (at most 4096 documents) per `encode_batch`.

    Raises:
      ValueError: the source holds no documents, or the tokenizer returns ids outside
        [0, vocab_size).
    """
    check_tokenizer(tokenizer)
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    key = cache_key(source, tokenizer)
    final = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(final, "meta.json")):
        log.info("token cache hit: %s", final)
        return _load(final)

    os.makedirs(cache_dir, exist_ok=True)
    vocab = int(tokenizer.vocab_size)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    encode, num_workers = _encoder(tokenizer, num_workers)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f"{_tmp_prefix(key)}{os.getpid()}-")
    t0 = time.time()
    try:
        lengths: list[int] = []
        digest = hashlib.sha256()
        raw_path = os.path.join(tmp, "tokens.raw")
        bar = tqdm(desc=f"tokenizing {source.description}", unit=" docs", disable=None)
        with (
            open(raw_path, "wb") as raw,
            concurrent.futures.ThreadPoolExecutor(num_workers) as pool,
        ):
            pending: list[concurrent.futures.Future] = []

            def drain(n_left: int) -> None:
                while len(pending) > n_left:
                    ids_list = pending.pop(0).result()
                    flat = np.fromiter(
                        itertools.chain.from_iterable(ids_list),
                        dtype=np.int64,
                        count=sum(len(ids) for ids in ids_list),
                    )
                    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
                        bad = flat[(flat < 0) | (flat >= vocab)][0]
                        raise ValueError(
                            f"tokenizer {type(tokenizer).__name__} returned id {bad}, outside "
                            f"[0, vocab_size={vocab})"
                        )
                    data = flat.astype(dtype).tobytes()
                    raw.write(data)
                    digest.update(data)
                    lengths.extend(len(ids) for ids in ids_list)
                    bar.update(len(ids_list))

            for chunk in _chunks(source.documents(), chunk_chars, 4096):
                pending.append(pool.submit(encode, chunk))
                drain(2 * num_workers)  # bounded: memory stays O(workers * chunk)
            drain(0)
        bar.close()
        if not lengths:
            raise ValueError(
                f"{source.description} holds no documents"
                + (
                    f" ({source.stats.empty_skipped} empty ones skipped)"
                    if source.stats.empty_skipped
                    else ""
                )
            )
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        digest.update(offsets.tobytes())
        n = int(offsets[-1])
        tok_path = os.path.join(tmp, "tokens.npy")
        if n:
            out = np.lib.format.open_memmap(tok_path, mode="w+", dtype=dtype, shape=(n,))
            with open(raw_path, "rb") as raw:
                step = 1 << 24
                for start in range(0, n, step):
                    count = min(step, n - start)
                    out[start : start + count] = np.frombuffer(
                        raw.read(count * dtype.itemsize), dtype=dtype
                    )
            out.flush()
            del out
        else:
            np.save(tok_path, np.zeros((0,), dtype))
        os.remove(raw_path)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        stats = dataclasses.asdict(source.stats)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "source": source.description,
            "identity": source.identity(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "vocab_size": vocab,
            "dtype": dtype.name,
            "num_documents": len(lengths),
            "num_tokens": n,
            "content_sha256": digest.hexdigest(),
            "stats": stats,
            "seconds": round(time.time() - t0, 3),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process built the same entry first; theirs is identical.
            if not os.path.isfile(os.path.join(final, "meta.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_builds(cache_dir, key)

    log.info(
        "tokenized %s: %d docs, %d tokens in %.1fs",
        source.description,
        len(lengths),
        n,
        time.time() - t0,
    )
    if stats["invalid_utf8"]:
        warnings.warn(
            f"{source.description}: {stats['invalid_utf8']} invalid UTF-8 byte sequence(s) in "
            f"{stats['invalid_utf8_documents']} document(s) were replaced by U+FFFD",
            stacklevel=2,
        )
    if stats["empty_skipped"]:
        warnings.warn(
            f"{source.description}: skipped {stats['empty_skipped']} empty document(s)",
            stacklevel=2,
        )
    return _load(final)


__all__ = [
    "DEFAULT_CACHE_DIR",
    "TokenizedCorpus",
    "Tokenizer",
    "cache_key",
    "check_tokenizer",
    "load_or_build",
    "tokenizer_fingerprint",
]
