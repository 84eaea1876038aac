"""The `Tokenizer` interface every backend implements, and the rules they share.

All backends share the rules that matter to a language model:
  - Text that looks like a special token (`"<|eot_id|>"` typed by a user) is plain text unless
    the caller allows it with `allowed_special`, as in Meta's reference (tiktoken with
    `disallowed_special=()`). A prompt must never be able to forge a turn boundary.
  - BPE inputs of any length are cut as Meta's reference cuts them (400k-character pieces, runs
    of at most 25,000 whitespace or non-whitespace characters), so the ids are Meta's ids.
  - `decode_bytes` returns raw bytes, so a streaming decoder can hold back an incomplete UTF-8
    character instead of printing a replacement character.
"""

from __future__ import annotations

import abc
import functools
import json
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from llama_jax.atomic import write_atomic
from llama_jax.tokenizer import chat
from llama_jax.tokenizer.chat import (
    BEGIN_OF_TEXT,
    END_OF_MESSAGE,
    END_OF_TEXT,
    END_OF_TURN,
    FINETUNE_RIGHT_PAD,
)
from llama_jax.tokenizer.chat_template import (
    TEMPLATE_FILE,
    encode_rendered,
    render_text,
    template_mask,
)

# Meta's reference limits: tiktoken is handed at most this many characters at a time...
MAX_ENCODE_CHARS = 400_000
# ...and never a run of more than this many consecutive whitespace or non-whitespace characters.
MAX_NO_WHITESPACE_CHARS = 25_000


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


def adds_bos(tokenizer: Any) -> bool:
    """Whether the model's plain text starts with BOS: as its GGUF states (`add_bos_token`;
    SmolLM2's does not, its id 1 is `<|im_start|>`), else yes (the Llama tokenizers), as
    transformers' tokenizer of the same model encodes it. The one rule for generate, serve
    and eval."""
    return bool(getattr(tokenizer, "add_bos_token", True))


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
      stop_ids: ids that end generation in chat (end of text, end of message, end of turn,
        and the eos ids of the model's tokenizer / generation config).
      chat_template: the model's jinja2 chat template (None: the built-in Llama 3 format).
      template_tokens: the `bos_token` / `eos_token` strings the chat template sees.
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
        self.chat_template: str | None = None
        self.template_tokens: dict[str, str] = {}

    def use_chat_settings(
        self,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        """Takes the model's chat settings (its template, the strings it sees, its eos ids).

        Args:
          chat_template: jinja2 text; None keeps the current one (the built-in format if unset).
          bos_token, eos_token: what the template sees (default: the text of bos_id / eos_id).
          eos_token_ids: more ids that end a turn (generation_config.json, the GGUF).
        """
        if chat_template is not None:
            # Compiled at the first dialog: a broken template must not stop plain generation.
            self.chat_template = chat_template
        for name, text in (("bos_token", bos_token), ("eos_token", eos_token)):
            if text is not None:
                self.template_tokens[name] = text
        extra = [self.special_tokens[eos_token]] if eos_token in self.special_tokens else []
        extra += [int(i) for i in eos_token_ids if 0 <= int(i) < self.vocab_size]
        self.stop_ids = tuple(sorted({*self.stop_ids, *extra}))

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
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        allowed_special: Collection[str] | Literal["all"] = (),
        **template_kwargs: Any,
    ) -> list[int]:
        """Encodes a conversation: THE place where a dialog becomes ids.

        With `chat_template` set (the model's own template, or `--chat_template FILE`), the
        template is rendered as transformers' `apply_chat_template` renders it; otherwise the
        built-in Llama 3 layout is used: `<|begin_of_text|>`, then per message
        `<|start_header_id|>` role `<|end_header_id|>` "\\n\\n" content.strip() `<|eot_id|>`,
        then `<|start_header_id|>assistant<|end_header_id|>\\n\\n` if `add_generation_prompt`.

        Args:
          messages: dicts with "role" and "content" (the built-in format takes the roles of
            CHAT_ROLES; "tool" is written as "ipython"; a template decides its own).
          add_generation_prompt: end with an open assistant turn for the model to complete.
          continue_final_message: end inside the final message, for the model to continue it.
          tools, documents: passed to the template (the built-in format takes none).
          allowed_special: special tokens whose text in a content becomes the special id. By
            default typed special-token text is plain text, so a user cannot forge a turn.
          **template_kwargs: further template variables (e.g. date_string).

        Returns:
          The token ids.
        """
        if self.chat_template is not None:
            return self._encode_template(
                messages,
                add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                allowed_special=allowed_special,
                template_kwargs=template_kwargs,
            )[0]
        if tools or documents or template_kwargs:
            given = [k for k, v in (("tools", tools), ("documents", documents)) if v]
            given += list(template_kwargs)
            raise ValueError(
                f"the built-in Llama 3 chat format takes no {', '.join(given)}"
                f" ({self.path} has no chat template): give one with --chat_template FILE"
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set")
        ids = chat.encode_dialog(
            self, messages, add_generation_prompt, allowed_special=allowed_special
        )
        if continue_final_message and messages:
            ids = ids[:-1]  # the final message stays open: no <|eot_id|>
        return ids

    def encode_dialog_masked(
        self, messages: Sequence[Mapping[str, Any]], train_on: str = "assistant"
    ) -> tuple[list[int], list[int]]:
        """A dialog's ids (as `encode_dialog(messages, add_generation_prompt=False)`) and its
        loss mask: 1 on the tokens to train on.

        Args:
          messages: the dialog.
          train_on: "assistant" (each assistant turn's content and end-of-turn token), "last"
            (the last assistant turn's), "all" (every token).
        """
        if self.chat_template is not None:
            return template_mask(self, messages, train_on)
        return chat.builtin_mask(self, messages, train_on)

    def _encode_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        *,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        allowed_special: Collection[str] | Literal["all"] = (),
        template_kwargs: Mapping[str, Any] | None = None,
        with_generation: bool = False,
    ) -> tuple[list[int], list[int] | None]:
        allowed = self._allowed(allowed_special) if allowed_special else frozenset()
        text = render_text(
            self.chat_template,
            messages,
            bos_token=self.template_tokens.get("bos_token", self.decode([self.bos_id])),
            eos_token=self.template_tokens.get("eos_token", self.decode([self.eos_id])),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            control_tokens=self.special_tokens.keys() - allowed,
            template_kwargs=template_kwargs,
        )
        return encode_rendered(self, text, with_generation=with_generation)

    def save(self, directory: str | os.PathLike) -> Path:
        """Copies the tokenizer file, byte for byte, into `directory` as `FILE_NAME`, with the
        chat template (`chat_template.jinja`) and the bos / eos token strings it sees.

        Args:
          directory: destination; created if missing.

        Returns:
          The path of the copy.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / self.FILE_NAME
        if not (dest.exists() and dest.samefile(self.path)):
            write_atomic(dest, self.path.read_bytes())  # never a partial tokenizer file
        if self.chat_template is not None:
            # The chat format travels with the tokenizer, so a fine-tuned model chats as trained.
            write_atomic(directory / TEMPLATE_FILE, self.chat_template)
            config = directory / "tokenizer_config.json"
            if self.template_tokens and not config.exists():
                write_atomic(config, json.dumps(self.template_tokens, indent=2))
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
