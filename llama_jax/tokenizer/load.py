"""Reading a tokenizer file of any supported format, told from its content."""

from __future__ import annotations

import os
import re
from pathlib import Path

from llama_jax.gguf_file import MAGIC as GGUF_MAGIC
from llama_jax.tokenizer.base import Tokenizer
from llama_jax.tokenizer.chat_template import read_template_files
from llama_jax.tokenizer.gguf import GGUFTokenizer
from llama_jax.tokenizer.hf_json import HuggingFaceTokenizer
from llama_jax.tokenizer.spm import SentencePieceTokenizer
from llama_jax.tokenizer.tiktoken_bpe import TiktokenTokenizer

FORMATS = (
    "a Llama 3 tiktoken BPE file (tokenizer.model: one 'base64-token rank' per line), "
    "a SentencePiece model (.model), a Hugging Face tokenizer.json, or a GGUF model file"
)


_BACKENDS: dict[str, type[Tokenizer]] = {
    b.FORMAT: b
    for b in (TiktokenTokenizer, SentencePieceTokenizer, HuggingFaceTokenizer, GGUFTokenizer)
}
# Looked for, in this order, when `load_tokenizer` is given a directory (Meta's own file is
# preferred: tiktoken encodes several times faster than the tokenizer.json backend).
DIRECTORY_FILES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def detect_format(data: bytes) -> str | None:
    """Tells a tokenizer file's format from its content.

    Args:
      data: the file's bytes.

    Returns:
      "tiktoken", "sentencepiece", "huggingface", "gguf", or None if it is none of them.
    """
    if data[:4] == GGUF_MAGIC:
        return "gguf"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{"):
        # A full JSON parse of a 9 MB file costs as much as loading it; tokenizers checks the
        # rest when it reads the file.
        return "huggingface" if b'"model"' in data else None
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return "tiktoken"
    import sentencepiece as spm

    try:
        if spm.SentencePieceProcessor(model_proto=data).get_piece_size() > 0:
            return "sentencepiece"
    except RuntimeError:  # not a ModelProto
        pass
    return None


def find_tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer file at `path`: the file itself, or the first of DIRECTORY_FILES in it.

    Args:
      path: a tokenizer file or a directory holding one.

    Returns:
      The file's path.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in DIRECTORY_FILES:
            if (path / name).is_file():
                return path / name
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a directory holding one GGUF model: its tokenizer is inside
            return ggufs[0]
        raise FileNotFoundError(
            f"no tokenizer file in directory {path} (looked for {', '.join(DIRECTORY_FILES)}); "
            f"accepted formats: {FORMATS}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer not found: {path} does not exist; pass {FORMATS}, or a directory "
            "holding one"
        )
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer file, or the tokenizer in a model directory.

    Args:
      path: a Llama 3 tiktoken `tokenizer.model`, a SentencePiece `.model`, a Hugging Face
        `tokenizer.json`, or a directory holding one (see DIRECTORY_FILES).

    Returns:
      The backend for the file's format, detected from its content, with the chat settings
      found beside the file (`chat_template.jinja`, `tokenizer_config.json`,
      `generation_config.json`; see `chat_template.read_template_files`).
    """
    file = find_tokenizer_file(path)
    with open(file, "rb") as f:
        if f.read(4) == GGUF_MAGIC:  # a whole model: read its metadata, not all its bytes
            return GGUFTokenizer(file)
    data = file.read_bytes()
    fmt = detect_format(data)
    if fmt is None:
        raise ValueError(f"{file} is not a tokenizer file in a known format; accepted: {FORMATS}")
    tok = _BACKENDS[fmt](file, data)
    # A model directory may keep Meta's file in original/ and the chat settings at its top.
    folders = [file.parent] + ([Path(path)] if Path(path).is_dir() else [])
    for folder in dict.fromkeys(p.resolve() for p in folders):
        tok.use_chat_settings(**read_template_files(folder))
    return tok
