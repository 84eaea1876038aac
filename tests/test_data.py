"""Tests of the data pipeline (llama_jax.data): sources, token cache, packing, loader.

References are independent of the code under test: the corpus is rebuilt here from the raw
documents (a byte-level tokenizer defined below), uninterrupted pipelines are compared with
resumed ones (in a fresh process), and one host's batches with two simulated hosts'.
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
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.data import (
    BATCH_KEYS,
    Packer,
    PackSpec,
    make_eval_iterator,
    make_train_iterator,
    parse_data_path,
)
from llama_jax.data import shakespeare as shk
from llama_jax.data import tokens as tokens_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 32  # seq_len of most tests
B = 8  # global batch of most tests


class ByteTokenizer:
    """ids = UTF-8 bytes; 256 = BOS, 257 = EOS, 258 = PAD."""

    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259
    fingerprint = "test-bytes-v1"

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts, *, bos=False, eos=False):
        self.calls += 1
        return [[self.bos_id] * bos + list(t.encode("utf-8")) + [self.eos_id] * eos for t in texts]


def make_documents(n: int, seed: int) -> list[str]:
    """Random documents of 1 to ~400 bytes: many shorter than a row, some spanning rows."""
    rng = random.Random(seed)
    words = ["thou", "art", "more", "lovely", "été", "日本", "and", "temperate", "rough", "winds"]
    docs = []
    for _ in range(n):
        k = rng.choice([1, 2, 5, 20, 60])
        docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, k))))
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": len(d)}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local corpus: one .jsonl plus two .txt files; returns (dir, documents in file order)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents(70, seed=1)
    write_jsonl(root / "a.jsonl", docs[:60])
    for i, d in enumerate(docs[60:62]):
        (root / f"b{i}.txt").write_text(d, encoding="utf-8")
    return str(root), docs[:62]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token_cache"))


def stream_of(docs, bos=True, eos=True):
    tok = ByteTokenizer()
    return tok.encode_batch(docs, bos=bos, eos=eos)


def numpy_batches(it):
    return [{k: np.asarray(v) for k, v in b.items()} for b in it]


def batch_hash(batch) -> str:
    h = hashlib.sha256()
    for k in BATCH_KEYS:
        h.update(np.ascontiguousarray(np.asarray(batch[k])).tobytes())
    return h.hexdigest()


def rows_of(batches):
    return [{k: b[k][i] for k in BATCH_KEYS} for b in batches for i in range(len(b["inputs"]))]


# ---------------------------------------------------------------------------------------------
# data_path parsing
# ---------------------------------------------------------------------------------------------


def test_parse_data_path():
    dp = parse_data_path("tfds:wiki40b/en:1.3.0")
    assert (dp.scheme, dp.name, dp.version) == ("tfds", "wiki40b/en", "1.3.0")
    assert (
        parse_data_path("tfds:lm1b").name == "lm1b" and parse_data_path("tfds:lm1b").version is None
    )
    assert parse_data_path("shakespeare").scheme == "shakespeare"
    assert parse_data_path("/data/*.jsonl") == parse_data_path("file:/data/*.jsonl")
    assert parse_data_path("data/x.txt").scheme == "files"
    with pytest.raises(ValueError, match=r"unknown scheme 'gs'.*'tfds:NAME"):
        parse_data_path("gs://bucket/corpus")
    with pytest.raises(ValueError, match=r"unknown scheme 'hf'"):
        parse_data_path("hf:allenai/c4")
    with pytest.raises(ValueError, match="not a valid TFDS name"):
        parse_data_path("tfds:bad name")
    with pytest.raises(ValueError, match="is empty"):
        parse_data_path("")


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_packing_hand_example():
    # Documents [1 2 3] and [4 5]; BOS=10, EOS=11, PAD=12; T=4; corpus order.
    # Stream: 10 1 2 3 11 | 10 4 5 11  (N=9 -> 3 rows).
    toks = np.array([1, 2, 3, 4, 5], np.uint16)
    offsets = np.array([0, 3, 5])
    packer = Packer(toks, offsets, PackSpec(4, 10, 11, 12), shuffle=False)
    assert (packer.num_tokens, packer.rows_per_epoch) == (9, 3)
    out = packer.rows(np.zeros(4, int), np.array([0, 1, 2, -1]))
    np.testing.assert_array_equal(
        out["inputs"], [[10, 1, 2, 3], [11, 10, 4, 5], [11, 12, 12, 12], [12] * 4]
    )
    np.testing.assert_array_equal(
        out["targets"], [[1, 2, 3, 11], [12, 4, 5, 11], [12] * 4, [12] * 4]
    )
    np.testing.assert_array_equal(
        out["loss_mask"], [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        out["segment_ids"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 0, 0, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        out["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    assert out["loss_mask"].dtype == np.float32 and out["inputs"].dtype == np.int32


def test_packing_long_document_split_into_pieces():
    # One 10-token document (no BOS/EOS) over rows of 4: pieces of 4, 4, 2; the prediction
    # across each cut is kept (targets[-1] is the next row's first token).
    packer = Packer(np.arange(10), np.array([0, 10]), PackSpec(4, None, None, 99), shuffle=False)
    out = packer.rows(np.zeros(3, int), np.arange(3))
    np.testing.assert_array_equal(out["inputs"], [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]])
    np.testing.assert_array_equal(out["targets"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 99, 99, 99]])
    np.testing.assert_array_equal(out["positions"][1], [0, 1, 2, 3])
    assert out["loss_mask"].sum() == 9  # every within-document prediction, once


def check_rows(rows, tok, *, bos=True, eos=True):
    """Structural invariants of packed rows."""
    for r in rows:
        seg, pos, inp, tgt, mask = (
            r["segment_ids"],
            r["positions"],
            r["inputs"],
            r["targets"],
            r["loss_mask"],
        )
        live = seg > 0
        n = int(live.sum())
        assert live[:n].all() and not live[n:].any(), "padding only at the end"
        assert (inp[n:] == tok.pad_id).all() and (mask[n:] == 0).all()
        if n == 0:
            continue
        assert seg[0] == 1 and np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
        starts = np.r_[True, seg[1:n] != seg[: n - 1]]
        assert (pos[:n][starts] == 0).all(), "positions restart at every piece"
        assert (np.diff(pos[:n])[~starts[1:]] == 1).all()
        # A piece starts with BOS exactly when it starts a document (or at a row start).
        is_bos = inp[:n] == tok.bos_id
        if bos:
            assert is_bos[starts][1:].all(), "every piece after the first starts a document"
            assert not is_bos[~starts].any()
        else:
            assert not is_bos.any()
        # Targets: the next input inside the row when in the same segment and masked in.
        inner = np.flatnonzero(mask[: n - 1] == 1)
        np.testing.assert_array_equal(tgt[inner], inp[inner + 1])
        assert (seg[inner] == seg[inner + 1]).all()
        assert (tgt[mask == 0] == tok.pad_id).all()
        if eos:
            assert (mask[:n][inp[:n] == tok.eos_id] == 0).all(), "no prediction after EOS"
            assert (tgt != tok.bos_id).all()


@pytest.mark.parametrize("bos,eos", [(True, True), (False, True), (True, False), (False, False)])
def test_one_epoch_every_token_exactly_once(corpus, cache_dir, bos, eos):
    path, docs = corpus
    tok = ByteTokenizer()
    it = make_train_iterator(
        path,
        tok,
        seq_len=T,
        global_batch_size=B,
        mesh=None,
        seed=3,
        num_epochs=1,
        add_bos=bos,
        add_eos=eos,
        cache_dir=cache_dir,
    )
    rows = rows_of(numpy_batches(it))
    assert len(rows) == it.num_steps * B
    check_rows(rows, tok, bos=bos, eos=eos)
    # Reference: the documents themselves.
    ref_docs = stream_of(docs, bos, eos)
    ref_tokens = collections.Counter(t for d in ref_docs for t in d)
    ref_pairs = collections.Counter(p for d in ref_docs for p in zip(d[:-1], d[1:]))
    got_tokens = collections.Counter(
        int(t) for r in rows for t in r["inputs"][r["segment_ids"] > 0]
    )
    got_pairs = collections.Counter(
        (int(a), int(b))
        for r in rows
        for a, b in zip(r["inputs"][r["loss_mask"] > 0], r["targets"][r["loss_mask"] > 0])
    )
    assert got_tokens == ref_tokens, "every token once: none lost, none repeated"
    assert got_pairs == ref_pairs, "every next-token prediction once"
    assert sum(got_tokens.values()) == it.tokens_per_epoch
    n_bos = sum(r["inputs"].tolist().count(tok.bos_id) for r in rows)
    n_eos = sum(r["inputs"].tolist().count(tok.eos_id) for r in rows)
    assert (n_bos, n_eos) == (len(docs) * bos, len(docs) * eos)
    with pytest.raises(StopIteration):
        next(it)


def test_shuffle_per_epoch_and_deterministic(corpus, cache_dir):
    path, _ = corpus
    kw = dict(seq_len=T, global_batch_size=B, mesh=None, cache_dir=cache_dir)
    a = make_train_iterator(path, ByteTokenizer(), seed=0, **kw)
    steps_per_epoch = int(a.steps_per_epoch)
    first = numpy_batches(a.batch_at(s) for s in range(steps_per_epoch))
    second = numpy_batches(a.batch_at(s + steps_per_epoch + 1) for s in range(steps_per_epoch))
    again = numpy_batches(
        make_train_iterator(path, ByteTokenizer(), seed=0, **kw).batch_at(s)
        for s in range(steps_per_epoch)
    )
    other = make_train_iterator(path, ByteTokenizer(), seed=1, **kw).batch_at(0)
    assert [batch_hash(b) for b in first] == [batch_hash(b) for b in again]
    assert batch_hash(first[0]) != batch_hash(other)
    assert {batch_hash(b) for b in first}.isdisjoint(batch_hash(b) for b in second)
    # In order (shuffle=False), the rows are the stream itself.
    plain = make_train_iterator(path, ByteTokenizer(), shuffle=False, num_epochs=1, **kw)
    rows = rows_of(numpy_batches(plain))
    got = [int(t) for r in rows for t in r["inputs"][r["segment_ids"] > 0]]
    assert got == [t for d in stream_of(corpus[1]) for t in d]


# ---------------------------------------------------------------------------------------------
# Loader: sharding, hosts, resume
# ---------------------------------------------------------------------------------------------


def test_global_batch_is_sharded_jax_array(corpus, cache_dir):
    path, _ = corpus
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    kw = dict(seq_len=T, global_batch_size=16, seed=5, cache_dir=cache_dir)
    it = make_train_iterator(path, ByteTokenizer(), mesh=mesh, **kw)
    ref = make_train_iterator(path, ByteTokenizer(), mesh=None, **kw)
    for _ in range(3):
        batch, want = next(it), next(ref)
        assert set(batch) == set(BATCH_KEYS)
        expected = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
        for k in BATCH_KEYS:
            x = batch[k]
            assert isinstance(x, jax.Array) and x.shape == (16, T)
            assert x.sharding.is_equivalent_to(expected, 2), x.sharding
            assert {s.data.shape for s in x.addressable_shards} == {(2, T)}
            np.testing.assert_array_equal(np.asarray(x), want[k])
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    it.close()


def test_two_hosts_are_disjoint_and_make_the_one_host_batch(corpus, cache_dir):
    path, _ = corpus
    kw = dict(seq_len=T, global_batch_size=B, mesh=None, seed=7, cache_dir=cache_dir)
    one = make_train_iterator(path, ByteTokenizer(), **kw)
    hosts = [
        make_train_iterator(path, ByteTokenizer(), process_index=i, process_count=2, **kw)
        for i in range(2)
    ]
    for _ in range(int(one.steps_per_epoch) + 3):  # across an epoch boundary
        g = next(one)
        h0, h1 = next(hosts[0]), next(hosts[1])
        for k in BATCH_KEYS:
            assert h0[k].shape == h1[k].shape == (B // 2, T)
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])
    # Disjoint: the hosts' rows of one epoch never repeat a (stream) row.
    ep = numpy_batches(hosts[0].batch_at(s) for s in range(int(one.steps_per_epoch)))
    ep += numpy_batches(hosts[1].batch_at(s) for s in range(int(one.steps_per_epoch)))
    hashes = [r["inputs"].tobytes() for r in rows_of(ep) if r["segment_ids"].any()]
    assert len(hashes) == len(set(hashes))


RESUME_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import jax, numpy as np
    from llama_jax.data import BATCH_KEYS, make_train_iterator

    class ByteTokenizer:
        bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259
        fingerprint = "test-bytes-v1"
        def encode_batch(self, texts, *, bos=False, eos=False):
            return [[256] * bos + list(t.encode("utf-8")) + [257] * eos for t in texts]

    args = json.loads(sys.argv[1])
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    it = make_train_iterator(args["path"], ByteTokenizer(), mesh=mesh, **args["kw"])
    it.set_state(json.loads(args["state"]))
    out = []
    for _ in range(10):
        b = next(it)
        h = hashlib.sha256()
        for k in BATCH_KEYS:
            h.update(np.ascontiguousarray(np.asarray(b[k])).tobytes())
        out.append(h.hexdigest())
    print("HASHES", json.dumps(out))
    """
)


def test_resume_in_fresh_process_is_bit_identical(corpus, cache_dir):
    path, _ = corpus
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    kw = dict(seq_len=T, global_batch_size=B, seed=11, cache_dir=cache_dir)
    k = int(make_train_iterator(path, ByteTokenizer(), mesh=None, **kw).steps_per_epoch) - 4
    full = make_train_iterator(path, ByteTokenizer(), mesh=mesh, **kw)
    want = [batch_hash(next(full)) for _ in range(k + 10)][k:]  # crosses an epoch boundary

    stopped = make_train_iterator(path, ByteTokenizer(), mesh=mesh, **kw)
    for _ in range(k):
        next(stopped)
    state = json.dumps(stopped.get_state())
    assert json.loads(state)["step"] == k

    # In process: a fresh iterator restored from the JSON.
    again = make_train_iterator(path, ByteTokenizer(), mesh=mesh, **kw)
    next(again)  # it has moved on; set_state must discard what it prefetched
    again.set_state(json.loads(state))
    assert [batch_hash(next(again)) for _ in range(10)] == want

    # In a fresh process.
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    arg = json.dumps({"path": path, "kw": kw, "state": state})
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, arg],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HASHES ")][-1]
    assert json.loads(line[len("HASHES ") :]) == want


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    args = json.loads(sys.argv[1])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args["addr"], num_processes=2, process_id=args["pid"]
    )
    from llama_jax.data import BATCH_KEYS, make_train_iterator

    class ByteTokenizer:
        bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259
        fingerprint = "test-bytes-v1"
        def encode_batch(self, texts, *, bos=False, eos=False):
            return [[256] * bos + list(t.encode("utf-8")) + [257] * eos for t in texts]

    # Batch shard i = 2 * data + fsdp lives on process fsdp: each process holds every other
    # block of rows, so its local rows are not contiguous.
    devices = np.array(jax.devices()).reshape(2, 4).T.reshape(4, 2, 1)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    it = make_train_iterator(args["path"], ByteTokenizer(), mesh=mesh, **args["kw"])
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
    out = []
    for _ in range(3):
        b = next(it)
        shards = {
            k: sorted(
                (s.index[0].start, np.asarray(s.data).tolist()) for s in b[k].addressable_shards
            )
            for k in BATCH_KEYS
        }
        out.append({"shards": shards, "mask_sum": float(total(b["loss_mask"]))})
    print("RESULT", json.dumps(out))
    """
)


def test_two_real_processes_build_the_global_batch(corpus, cache_dir):
    """Two JAX processes (gloo) with non-contiguous local rows make the one-host batches."""
    import socket

    path, _ = corpus
    kw = dict(seq_len=T, global_batch_size=16, seed=13, cache_dir=cache_dir)
    ref = make_train_iterator(path, ByteTokenizer(), mesh=None, **kw)
    want = [next(ref) for _ in range(3)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                MULTIPROCESS_SCRIPT,
                json.dumps({"addr": f"127.0.0.1:{port}", "pid": pid, "path": path, "kw": kw}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for pid in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(
            json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
        )
    for step in range(3):
        for pid in range(2):
            got = results[pid][step]
            assert got["mask_sum"] == float(want[step]["loss_mask"].sum())
            starts = [start for start, _ in got["shards"]["inputs"]]
            assert starts == [pid * 2 + 4 * i for i in range(4)], starts
            for k in BATCH_KEYS:
                for start, rows in got["shards"][k]:
                    np.testing.assert_array_equal(
                        np.asarray(rows), want[step][k][start : start + 2]
                    )


def test_state_checks(corpus, cache_dir):
    path, _ = corpus
    kw = dict(seq_len=T, global_batch_size=B, mesh=None, cache_dir=cache_dir)
    it = make_train_iterator(path, ByteTokenizer(), seed=0, **kw)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state
    other = make_train_iterator(path, ByteTokenizer(), seed=1, **kw)
    with pytest.raises(ValueError, match=r"different pipeline.*'seed': \(0, 1\)"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        it.set_state({"step": 3})
    finite = make_train_iterator(path, ByteTokenizer(), seed=0, num_epochs=1, **kw)
    with pytest.raises(ValueError, match="past the end of this stream"):
        finite.set_state({**state, "step": 10_000})
    assert it.state_dict() == state  # alias


def test_eval_iterator_exact_and_restarts(corpus, cache_dir):
    path, docs = corpus
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    ev = make_eval_iterator(
        path,
        ByteTokenizer(),
        seq_len=T,
        global_batch_size=B,
        mesh=mesh,
        split="train[50:]",
        cache_dir=cache_dir,
    )
    first, second = numpy_batches(ev), numpy_batches(ev)
    assert len(first) == len(ev) and [batch_hash(b) for b in first] == [
        batch_hash(b) for b in second
    ]
    rows = rows_of(first)
    got = [int(t) for r in rows for t in r["inputs"][r["segment_ids"] > 0]]
    assert got == [t for d in stream_of(docs[50:]) for t in d], "whole split, in order"
    assert sum(float(b["loss_mask"].sum()) for b in first) == ev.num_predictions
    assert ev.num_predictions == sum(len(d) - 1 for d in stream_of(docs[50:]))
    assert not rows[-1]["segment_ids"].any(), "last batch padded with empty rows"
    check_rows(rows, ByteTokenizer())
