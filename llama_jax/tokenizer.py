"""Tokenizers: one interface, three backends, and the Llama 3 chat format.

`load_tokenizer(path)` reads any of
  - a Llama 3 `tokenizer.model`: tiktoken BPE ranks, one `base64-token rank` per line;
  - a SentencePiece `.model` (a serialized protobuf), e.g. one made by `train_tokenizer`;
  - a Hugging Face `tokenizer.json`;
  - a directory holding one of them (`tokenizer.model` first, then `tokenizer.json`).
The format is told from the content, never from the file name, because both binary formats
are called `tokenizer.model`.

All backends share the rules that matter to a language model:
  - Text that looks like a special token (`"<|eot_id|>"` typed by a user) is plain text unless
    the caller allows it with `allowed_special`, as in Meta's reference (tiktoken with
    `disallowed_special=()`). A prompt must never be able to forge a turn boundary.
  - BPE inputs of any length are cut as Meta's reference cuts them (400k-character pieces, runs
    of at most 25,000 whitespace or non-whitespace characters), so the ids are Meta's ids.
  - `decode_bytes` returns raw bytes, so a streaming decoder can hold back an incomplete UTF-8
    character instead of printing a replacement character.

Training a SentencePiece tokenizer lives in `llama_jax.tokenizer_train`.
"""

from __future__ import annotations

import abc
import base64
import functools
import math
import os
import re
import shutil
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

# ------------------------------------------------------------------------------ Llama 3 constants

# The pre-tokenisation pattern of Meta's reference `llama/tokenizer.py` (also in tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256

# Meta's reference limits: tiktoken is handed at most this many characters at a time...
MAX_ENCODE_CHARS = 400_000
# ...and never a run of more than this many consecutive whitespace or non-whitespace characters.
MAX_NO_WHITESPACE_CHARS = 25_000

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
FINETUNE_RIGHT_PAD = "<|finetune_right_pad_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_MESSAGE = "<|eom_id|>"
END_OF_TURN = "<|eot_id|>"
PYTHON_TAG = "<|python_tag|>"

# Roles of the Llama 3 chat format; "tool" is the Hugging Face name of "ipython".
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")
_ROLE_HEADER = {"tool": "ipython"}

FORMATS = (
    "a Llama 3 tiktoken BPE file (tokenizer.model: one 'base64-token rank' per line), "
    "a SentencePiece model (.model), or a Hugging Face tokenizer.json"
)


def llama3_special_tokens(num_base_tokens: int = 128_000) -> dict[str, int]:
    """The Llama 3.1+ special tokens, numbered after the BPE ranks.

    Args:
      num_base_tokens: number of BPE ranks (128,000 for Llama 3).

    Returns:
      name -> id for 256 tokens, ids num_base_tokens .. num_base_tokens + 255.
    """
    names = [
        BEGIN_OF_TEXT,
        END_OF_TEXT,
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        FINETUNE_RIGHT_PAD,
        "<|reserved_special_token_2|>",
        START_HEADER,
        END_HEADER,
        END_OF_MESSAGE,
        END_OF_TURN,
        PYTHON_TAG,
    ]
    first_reserved = 3
    names += [
        f"<|reserved_special_token_{i}|>"
        for i in range(first_reserved, first_reserved + LLAMA3_NUM_SPECIAL_TOKENS - len(names))
    ]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


# --------------------------------------------------------------------------------- long inputs


@functools.cache
def _is_space_table() -> np.ndarray:
    # str.isspace for every code point, so long texts are classified with one gather.
    table = np.zeros(0x110000, dtype=bool)
    table[[c for c in range(0x110000) if chr(c).isspace()]] = True
    return table


def split_long_text(
    text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_NO_WHITESPACE_CHARS
) -> list[str]:
    """Cuts `text` exactly where Meta's reference Llama 3 tokenizer cuts it.

    The reference encodes `max_chars`-character pieces separately and, inside each, cuts every
    run of consecutive whitespace (or non-whitespace) characters longer than `max_run` after
    each `max_run` characters. Its per-character Python loop takes seconds on megabytes, so the
    runs are found here with numpy; the cut points are the same.

    Args:
      text: any string.
      max_chars: length of the pieces the text is first cut into.
      max_run: longest run of whitespace or non-whitespace characters in one piece.

    Returns:
      Pieces whose concatenation is `text`.
    """
    if len(text) <= min(max_run, max_chars):
        return [text]
    pieces = []
    for start in range(0, len(text), max_chars):
        chunk = text[start : start + max_chars]
        if len(chunk) <= max_run:
            pieces.append(chunk)
            continue
        # surrogatepass: a lone surrogate is still one code point, as in Python indexing.
        cps = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        space = _is_space_table()[cps]
        edges = np.flatnonzero(space[1:] != space[:-1]) + 1
        run_starts = np.concatenate(([0], edges))
        run_ends = np.concatenate((edges, [len(chunk)]))
        cuts = [
            cut
            for i in np.flatnonzero(run_ends - run_starts > max_run)
            for cut in range(int(run_starts[i]) + max_run, int(run_ends[i]), max_run)
        ]
        bounds = [0, *cuts, len(chunk)]
        pieces.extend(chunk[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    return pieces


def _without_surrogates(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded; tiktoken replaces them with U+FFFD the same way.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@functools.lru_cache(maxsize=64)
def _special_regex(tokens: frozenset[str]) -> re.Pattern[str]:
    # Longest first, so a token that is a prefix of another cannot shadow it.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


# ----------------------------------------------------------------------------------- interface


class Tokenizer(abc.ABC):
    """Text <-> token ids, the same way for every backend.

    Attributes:
      path: the file this tokenizer was read from (`save` copies it as it came).
      special_tokens: name -> id of the tokens that are never produced from plain text.
      bos_id: id prepended by `encode(..., bos=True)`.
      eos_id: id appended by `encode(..., eos=True)`; ends a document in pretraining.
      pad_id: id used for padding, or None if the tokenizer has no pad token.
      stop_ids: ids that end generation in chat (end of text, end of message, end of turn).
    """

    FORMAT: ClassVar[str]
    FILE_NAME: ClassVar[str]  # the tokenizer's file name in a model directory

    def __init__(self, path: str | os.PathLike, special_tokens: Mapping[str, int]) -> None:
        self.path = Path(path)
        self.special_tokens = dict(special_tokens)
        self.bos_id = self._find_special((BEGIN_OF_TEXT, "<s>", "<bos>", "<|endoftext|>"), "bos")
        self.eos_id = self._find_special((END_OF_TEXT, "</s>", "<eos>", "<|endoftext|>"), "eos")
        pads = [self.special_tokens[t] for t in (FINETUNE_RIGHT_PAD, "<pad>") if t in self]
        self.pad_id: int | None = pads[0] if pads else None
        stops = {self.eos_id} | {
            self.special_tokens[t] for t in (END_OF_MESSAGE, END_OF_TURN) if t in self
        }
        self.stop_ids: tuple[int, ...] = tuple(sorted(stops))

    def __contains__(self, special_token: str) -> bool:
        return special_token in self.special_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def _find_special(self, candidates: Sequence[str], what: str) -> int:
        for name in candidates:
            if name in self:
                return self.special_tokens[name]
        raise ValueError(
            f"{self.path}: no {what} token among the special tokens (looked for "
            f"{', '.join(candidates)}); a language-model tokenizer needs one"
        )

    # -- backend hooks

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; every id is in [0, vocab_size)."""

    @abc.abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, special-token text encoded as plain text."""

    @abc.abstractmethod
    def _decode_bytes(self, ids: list[int]) -> bytes:
        """Bytes of in-range `ids`, special tokens rendered as their text."""

    def _encode_ordinary_many(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """`_encode_ordinary` over `texts` on `num_threads` threads, for GIL-free backends."""
        if num_threads <= 1 or len(texts) <= 1:
            return [self._encode_ordinary(t) for t in texts]
        # Contiguous blocks, not one future per text (which costs more than a short text takes
        # to encode); many blocks per thread so that uneven lengths and busy cores even out.
        size = math.ceil(len(texts) / (16 * num_threads))
        blocks = [texts[i : i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(num_threads) as pool:
            done = pool.map(lambda block: [self._encode_ordinary(t) for t in block], blocks)
            return [ids for block in done for ids in block]

    # -- public interface

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Collection[str] | Literal["all"] = (),
    ) -> list[int]:
        """Encodes one string.

        Args:
          text: the string, of any length.
          bos: prepend `bos_id`.
          eos: append `eos_id`.
          allowed_special: special tokens whose text becomes the special id when it occurs in
            `text` ("all" for every one). All other special-token text is encoded as plain text.

        Returns:
          The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special) if allowed_special else frozenset()
        if not allowed:
            ids = self._encode_ordinary(text)
        else:
            ids, start = [], 0
            for match in _special_regex(allowed).finditer(text):
                ids += self._encode_ordinary(text[start : match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
            ids += self._encode_ordinary(text[start:])
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self,
        texts: Iterable[str],
        *,
        bos: bool = False,
        eos: bool = False,
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Encodes many strings in parallel; special-token text is plain text.

        Args:
          texts: the strings.
          bos: prepend `bos_id` to each.
          eos: append `eos_id` to each.
          num_threads: worker threads (default: all cores); 1 encodes in this thread.

        Returns:
          One list of ids per string, in order.
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch takes strs, got {type(text).__name__} at index {i}")
        if num_threads is None:
            num_threads = os.cpu_count() or 1
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None for all cores), got {num_threads}")
        batch = self._encode_ordinary_many(texts, num_threads)
        if bos or eos:
            head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
            batch = [head + ids + tail for ids in batch]
        return batch

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids`, special tokens as their text; never drops a partial character.

        Args:
          ids: token ids (a list, or a 1-D numpy/JAX array).

        Returns:
          The concatenated bytes of the tokens, which may end inside a UTF-8 character.
        """
        return self._decode_bytes(self._checked_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken.

        Args:
          ids: token ids (a list, or a 1-D numpy/JAX array).

        Returns:
          The decoded string, special tokens rendered as their text.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_dialog(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        *,
        allowed_special: Collection[str] | Literal["all"] = (),
    ) -> list[int]:
        """Encodes a conversation in the Llama 3 chat layout.

        `<|begin_of_text|>`, then per message `<|start_header_id|>` role `<|end_header_id|>`
        "\\n\\n" content.strip() `<|eot_id|>`, then `<|start_header_id|>assistant
        <|end_header_id|>\\n\\n` if `add_generation_prompt`.

        Args:
          messages: dicts with "role" (one of CHAT_ROLES; "tool" is written as "ipython") and
            "content" (str).
          add_generation_prompt: end with an open assistant header for the model to complete.
          allowed_special: special tokens whose text in a content becomes the special id. By
            default typed special-token text is plain text, so a user cannot forge a turn.

        Returns:
          The token ids.
        """
        missing = [t for t in (START_HEADER, END_HEADER, END_OF_TURN) if t not in self]
        if missing:
            raise ValueError(
                f"{self.path} has no Llama 3 chat tokens ({', '.join(missing)} missing): use a "
                "Llama 3 tokenizer or one made by train_tokenizer"
            )
        ids = [self.bos_id]
        for i, message in enumerate(messages):
            role, content = self._check_message(i, message)
            ids += self._encode_header(role)
            ids += self.encode(content.strip(), allowed_special=allowed_special)
            ids.append(self.special_tokens[END_OF_TURN])
        if add_generation_prompt:
            ids += self._encode_header("assistant")
        return ids

    def save(self, directory: str | os.PathLike) -> Path:
        """Copies the tokenizer file, byte for byte, into `directory` as `FILE_NAME`.

        Args:
          directory: destination; created if missing.

        Returns:
          The path of the copy.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / self.FILE_NAME
        if not (dest.exists() and dest.samefile(self.path)):
            shutil.copyfile(self.path, dest)
        return dest

    # -- helpers

    def _allowed(self, allowed_special: Collection[str] | Literal["all"]) -> frozenset[str]:
        if isinstance(allowed_special, str):
            if allowed_special != "all":
                raise ValueError(
                    f"allowed_special must be 'all' or a collection of special tokens, got "
                    f"the string {allowed_special!r} (wrap one token in a tuple)"
                )
            return frozenset(self.special_tokens)
        allowed = frozenset(allowed_special)
        unknown = sorted(allowed - self.special_tokens.keys())
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens: {unknown}")
        return allowed

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # numpy and JAX arrays
            ids = ids.tolist()
        ids = ids if isinstance(ids, list) else list(ids)
        if ids and not isinstance(ids[0], int):
            if not isinstance(ids[0], np.integer):
                raise TypeError(f"token ids must be ints, got {type(ids[0]).__name__}")
            ids = [int(i) for i in ids]
        vocab_size = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(i for i in ids if not 0 <= i < vocab_size)
            raise ValueError(
                f"token id {bad} is outside the vocabulary: valid ids are 0..{vocab_size - 1}"
            )
        return ids

    @staticmethod
    def _check_message(index: int, message: Mapping[str, str]) -> tuple[str, str]:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"message {index} must be a dict with 'role' and 'content', got {message!r}"
            )
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(
                f"message {index} has unknown role {role!r}: valid roles are "
                f"{', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a str, got {type(content).__name__}")
        return _ROLE_HEADER.get(role, role), content

    def _encode_header(self, role: str) -> list[int]:
        return [
            self.special_tokens[START_HEADER],
            *self._encode_ordinary(role),
            self.special_tokens[END_HEADER],
            *self._encode_ordinary("\n\n"),
        ]


# ------------------------------------------------------------------------------------ backends


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


# ------------------------------------------------------------------------------------- loading

_BACKENDS: dict[str, type[Tokenizer]] = {
    b.FORMAT: b for b in (TiktokenTokenizer, SentencePieceTokenizer, HuggingFaceTokenizer)
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
      "tiktoken", "sentencepiece", "huggingface", or None if it is none of them.
    """
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
      The backend for the file's format, detected from its content.
    """
    file = find_tokenizer_file(path)
    data = file.read_bytes()
    fmt = detect_format(data)
    if fmt is None:
        raise ValueError(f"{file} is not a tokenizer file in a known format; accepted: {FORMATS}")
    return _BACKENDS[fmt](file, data)


def __getattr__(name: str) -> Any:
    # `train_tokenizer` lives in its own module (it imports this one); re-export it lazily.
    if name == "train_tokenizer":
        from llama_jax.tokenizer_train import train_tokenizer

        return train_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------- CLI


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama3 tokenizer {train,encode,decode,info} ...`.

    The argument parsing lives in `llama_jax.tokenizer_train` beside `train_tokenizer`.

    Args:
      argv: arguments after `tokenizer` (default: sys.argv[1:]).

    Returns:
      The exit status: 0 on success, 1 on a user error (message on stderr).
    """
    from llama_jax.tokenizer_train import build_cli_parser, run_cli

    args = build_cli_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
