"""Llama 3's own tokenizer format: tiktoken BPE ranks plus the 256 Llama 3.1+ special tokens."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from llama_jax.tokenizer.base import MAX_NO_WHITESPACE_CHARS, Tokenizer, split_long_text
from llama_jax.tokenizer.chat import llama3_special_tokens

# The pre-tokenisation pattern of Meta's reference `llama/tokenizer.py` (also in tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256


class TiktokenTokenizer(Tokenizer):
    """Llama 3's own format: tiktoken BPE ranks plus the 256 Llama 3.1+ special tokens."""

    FORMAT = "tiktoken"
    FILE_NAME = "tokenizer.model"

    def __init__(self, path: str | os.PathLike, data: bytes | None = None) -> None:
        """Reads a tiktoken BPE file.

        Args:
          path: the file, one `base64-token rank` per line with ranks 0..n-1.
          data: the file's bytes if already read.
        """
        import tiktoken

        path = Path(path)
        if data is None:
            data = path.read_bytes()
        ranks = {}
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{lineno}: not a tiktoken BPE line ('base64-token rank'): {line[:80]!r}"
                ) from e
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: the BPE ranks must be 0..{len(ranks) - 1}, each once")
        special = llama3_special_tokens(len(ranks))
        self._encoding = tiktoken.Encoding(
            name=path.stem, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        self._vocab_size = len(ranks) + len(special)
        super().__init__(path, special)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode_ordinary(self, text: str) -> list[int]:
        encode = self._encoding.encode_ordinary  # releases the GIL while it works
        if len(text) <= MAX_NO_WHITESPACE_CHARS:
            return encode(text)
        ids = []
        for piece in split_long_text(text):
            ids += encode(piece)
        return ids

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return self._encoding.decode_bytes(ids)
