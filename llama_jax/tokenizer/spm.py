"""A SentencePiece model, e.g. one made by `llama_jax.tokenizer.train`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from llama_jax.tokenizer.base import Tokenizer, _without_surrogates


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, e.g. one made by `train_tokenizer` (byte fallback, Llama 3 specials).

    Special tokens are the model's control symbols (bos, eos, pad and the chat tokens), which
    SentencePiece never produces from text. SentencePiece writes spaces as U+2581 ("▁"), so that
    character in the input decodes as a space.
    """

    FORMAT = "sentencepiece"
    FILE_NAME = "tokenizer.model"

    def __init__(self, path: str | os.PathLike, data: bytes | None = None) -> None:
        """Reads a SentencePiece model.

        Args:
          path: the file.
          data: the file's bytes if already read.
        """
        import sentencepiece as spm

        path = Path(path)
        if data is None:
            data = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a valid SentencePiece model: {e}") from e
        sp = self._sp
        n = sp.get_piece_size()
        special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i)}
        # Models with add_dummy_prefix (e.g. Llama 2's) start every text with a space that
        # decoding removes again; decode_bytes must do the same.
        first = sp.encode("a", out_type=str)
        self._dummy_prefix = bool(first) and first[0].startswith("\u2581")
        table = []
        for i in range(n):
            if sp.is_byte(i):
                table.append(bytes([int(sp.id_to_piece(i)[1:-1], 16)]))  # "<0x41>"
            elif sp.is_unknown(i):
                table.append(" \u2047 ".encode())  # what SentencePiece decodes <unk> to
            else:
                table.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._table = table
        super().__init__(path, special)

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return self._sp.encode(text)
        except RuntimeError:  # pybind11 "Unable to cast" a str holding a lone surrogate
            fixed = _without_surrogates(text)
            if fixed == text:
                raise
            return self._sp.encode(fixed)

    def _encode_ordinary_many(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # SentencePiece's batch encoder runs its own threads without the GIL.
        try:
            return self._sp.encode(texts, num_threads=num_threads)
        except RuntimeError:
            fixed = [_without_surrogates(t) for t in texts]
            if fixed == texts:
                raise
            return self._sp.encode(fixed, num_threads=num_threads)

    def _decode_bytes(self, ids: list[int]) -> bytes:
        parts = [self._table[i] for i in ids]
        if self._dummy_prefix:
            # SentencePiece drops the added space from the first piece after leading controls.
            specials = self._specials
            first = next((k for k, i in enumerate(ids) if i not in specials), None)
            if first is not None and parts[first].startswith(b" "):
                parts[first] = parts[first][1:]
        return b"".join(parts)

    @functools.cached_property
    def _specials(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())
