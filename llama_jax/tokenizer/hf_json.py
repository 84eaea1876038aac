"""A Hugging Face `tokenizer.json`, read with the `tokenizers` library."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from llama_jax.tokenizer.base import Tokenizer, _without_surrogates, split_long_text


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` library."""

    FORMAT = "huggingface"
    FILE_NAME = "tokenizer.json"

    def __init__(self, path: str | os.PathLike, data: bytes | None = None) -> None:
        """Reads a tokenizer.json.

        Args:
          path: the file.
          data: the file's bytes if already read.
        """
        import tokenizers

        path = Path(path)
        if data is None:
            data = path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json: {e}") from e
        # tokenizers matches special-token text anywhere in the input; with this flag it
        # encodes it as plain text, and `encode` inserts allowed special ids itself.
        self._tok.encode_special_tokens = True
        added = self._tok.get_added_tokens_decoder()
        special = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._byte_level = isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel)
        # Meta's cuts are for byte-level BPE; a Metaspace model would add a space at each cut.
        self._cut_like_meta = self._byte_level and isinstance(
            self._tok.model, tokenizers.models.BPE
        )
        super().__init__(path, special)
        # The file's post-processor says whether plain text starts with BOS (Llama 3's
        # template does; SmolLM2's adds nothing): transformers' tokenizer of the same file
        # prepends exactly what `encode(add_special_tokens=True)` does here.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self.add_bos_token = bool(probe) and probe[0] == self.bos_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _pieces(self, text: str) -> list[str]:
        # Llama 3 is cut like Meta's reference cuts it, so that both backends agree.
        return split_long_text(text) if self._cut_like_meta else [text]

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for piece in self._pieces(text):
            try:
                ids += self._tok.encode(piece, add_special_tokens=False).ids
            except TypeError:  # a lone surrogate; tokenizers says "must be str"
                ids += self._tok.encode(_without_surrogates(piece), add_special_tokens=False).ids
        return ids

    def _encode_ordinary_many(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # `Tokenizer.encode` holds the GIL, so threads do not help; the native batch encoder
        # runs on the library's own (Rayon) pool, sized by RAYON_NUM_THREADS.
        if num_threads <= 1:
            return [self._encode_ordinary(t) for t in texts]
        pieces = [self._pieces(t) for t in texts]
        flat = [p for ps in pieces for p in ps]
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not use.
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            encoded = encode_batch(flat, add_special_tokens=False)
        except TypeError:  # a lone surrogate somewhere
            encoded = encode_batch([_without_surrogates(p) for p in flat], add_special_tokens=False)
        out, k = [], 0
        for ps in pieces:
            ids = []
            for e in encoded[k : k + len(ps)]:
                ids += e.ids
            out.append(ids)
            k += len(ps)
        return out

    @functools.cached_property
    def _byte_table(self) -> list[bytes]:
        # id -> bytes, undoing GPT-2's byte-to-printable-character mapping.
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        table = [b""] * self._vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            table[i] = bytes(to_byte[c] for c in token)
        for i, t in self._tok.get_added_tokens_decoder().items():
            table[i] = t.content.encode("utf-8")
        return table

    def _decode_bytes(self, ids: list[int]) -> bytes:
        if self._byte_level:
            table = self._byte_table
            return b"".join([table[i] for i in ids])
        # Other decoders (e.g. Metaspace) only give text; a partial character is lost here.
        return self._tok.decode(ids, skip_special_tokens=False).encode("utf-8")


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible map from bytes to printable characters, used by ByteLevel BPE.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}
