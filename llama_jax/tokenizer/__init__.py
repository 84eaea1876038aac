"""Tokenizers: one interface, three backends, the Llama 3 chat format and chat templates.

`load_tokenizer(path)` reads any of
  - a Llama 3 `tokenizer.model`: tiktoken BPE ranks, one `base64-token rank` per line;
  - a SentencePiece `.model` (a serialized protobuf), e.g. one made by `train_tokenizer`;
  - a Hugging Face `tokenizer.json`;
  - a directory holding one of them (`tokenizer.model` first, then `tokenizer.json`).
The format is told from the content, never from the file name, because both binary formats
are called `tokenizer.model`.

Modules (each imports only those above it):
  chat          the Llama 3 special tokens, roles and dialog layout (no backend needed)
  chat_template a model's own jinja2 chat template, rendered as transformers renders it
  base          the `Tokenizer` interface and the long-input rules every backend shares
  tiktoken_bpe, spm, hf_json    one backend each
  load          `load_tokenizer`: the format told from a file's content
  train         training a SentencePiece tokenizer with the Llama 3 special tokens
  cli           `llama3 tokenizer {train,encode,decode,info}`
"""

from llama_jax.tokenizer.base import (
    MAX_ENCODE_CHARS,
    MAX_NO_WHITESPACE_CHARS,
    Tokenizer,
    split_long_text,
)
from llama_jax.tokenizer.chat import (
    BEGIN_OF_TEXT,
    CHAT_ROLES,
    END_HEADER,
    END_OF_MESSAGE,
    END_OF_TEXT,
    END_OF_TURN,
    FINETUNE_RIGHT_PAD,
    LLAMA3_NUM_SPECIAL_TOKENS,
    PYTHON_TAG,
    START_HEADER,
    llama3_special_tokens,
)
from llama_jax.tokenizer.cli import cli_main
from llama_jax.tokenizer.hf_json import HuggingFaceTokenizer
from llama_jax.tokenizer.load import (
    DIRECTORY_FILES,
    FORMATS,
    detect_format,
    find_tokenizer_file,
    load_tokenizer,
)
from llama_jax.tokenizer.spm import SentencePieceTokenizer
from llama_jax.tokenizer.tiktoken_bpe import LLAMA3_PATTERN, TiktokenTokenizer
from llama_jax.tokenizer.train import min_vocab_size, train_tokenizer

__all__ = [
    "BEGIN_OF_TEXT",
    "CHAT_ROLES",
    "DIRECTORY_FILES",
    "END_HEADER",
    "END_OF_MESSAGE",
    "END_OF_TEXT",
    "END_OF_TURN",
    "FINETUNE_RIGHT_PAD",
    "FORMATS",
    "LLAMA3_NUM_SPECIAL_TOKENS",
    "LLAMA3_PATTERN",
    "MAX_ENCODE_CHARS",
    "MAX_NO_WHITESPACE_CHARS",
    "PYTHON_TAG",
    "START_HEADER",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "cli_main",
    "detect_format",
    "find_tokenizer_file",
    "llama3_special_tokens",
    "load_tokenizer",
    "min_vocab_size",
    "split_long_text",
    "train_tokenizer",
]
