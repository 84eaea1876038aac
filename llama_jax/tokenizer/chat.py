"""The Llama 3 chat format: special tokens, roles, and how a dialog becomes ids.

Meta's way: `<|begin_of_text|>`, then per message `<|start_header_id|>` role
`<|end_header_id|>` "\\n\\n" content.strip() `<|eot_id|>`. The header and the content are
encoded apart, so the ids of a content never depend on its neighbours.

This module works on any object with the `Tokenizer` interface (`encode`, `special_tokens`,
`bos_id`); it imports no backend.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

LLAMA3_NUM_SPECIAL_TOKENS = 256

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


def check_message(index: int, message: Mapping[str, str]) -> tuple[str, str]:
    """(header role, content) of a message dict; a clear error for a malformed one."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise ValueError(
            f"message {index} must be a dict with 'role' and 'content', got {message!r}"
        )
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise ValueError(
            f"message {index} has unknown role {role!r}: valid roles are {', '.join(CHAT_ROLES)}"
        )
    if not isinstance(content, str):
        raise ValueError(f"message {index} content must be a str, got {type(content).__name__}")
    return _ROLE_HEADER.get(role, role), content


def encode_header(tok: Any, role: str) -> list[int]:
    """`<|start_header_id|>` role `<|end_header_id|>` "\\n\\n" as ids."""
    return [
        tok.special_tokens[START_HEADER],
        *tok.encode(role),
        tok.special_tokens[END_HEADER],
        *tok.encode("\n\n"),
    ]


def require_chat_tokens(tok: Any) -> None:
    """Raises unless `tok` has the Llama 3 chat tokens."""
    missing = [t for t in (START_HEADER, END_HEADER, END_OF_TURN) if t not in tok.special_tokens]
    if missing:
        raise ValueError(
            f"{tok.path} has no Llama 3 chat tokens ({', '.join(missing)} missing): use a "
            "Llama 3 tokenizer or one made by train_tokenizer"
        )


def render_dialog(
    tok: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    allowed_special: Collection[str] | Literal["all"] = (),
) -> tuple[list[int], list[tuple[int, int, int, str]]]:
    """Encodes a dialog once and says which message and part each token came from.

    Args:
      tok: a Tokenizer with the chat tokens.
      messages: dicts with "role" and "content".
      allowed_special: as for `Tokenizer.encode`.

    Returns:
      (ids, spans): ids as `encode_dialog(messages, add_generation_prompt=False)` gives them,
      and (start, stop, message index, part) for every piece, part one of "bos", "header",
      "content", "eot" (message index -1 for the leading bos), covering ids in order.
    """
    require_chat_tokens(tok)
    ids = [tok.bos_id]
    spans = [(0, 1, -1, "bos")]
    for i, message in enumerate(messages):
        role, content = check_message(i, message)
        for part, piece in (
            ("header", encode_header(tok, role)),
            ("content", tok.encode(content.strip(), allowed_special=allowed_special)),
            ("eot", [tok.special_tokens[END_OF_TURN]]),
        ):
            spans.append((len(ids), len(ids) + len(piece), i, part))
            ids += piece
    return ids, spans


def encode_dialog(
    tok: Any,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    *,
    allowed_special: Collection[str] | Literal["all"] = (),
) -> list[int]:
    """Encodes a conversation in the Llama 3 chat layout (see `Tokenizer.encode_dialog`)."""
    ids, _ = render_dialog(tok, messages, allowed_special=allowed_special)
    if add_generation_prompt:
        ids += encode_header(tok, "assistant")
    return ids


def builtin_mask(
    tok: Any, messages: Sequence[Mapping[str, str]], train_on: str
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a dialog in the Llama 3 format: mask 1 on the content and `<|eot_id|>` of
    the chosen assistant turns ("assistant": all, "last": the last one; "all": every token)."""
    if train_on not in ("assistant", "last", "all"):
        raise ValueError(f"train_on={train_on!r}; valid: assistant, last, all")
    ids, spans = render_dialog(tok, messages)
    if train_on == "all":
        return ids, [1] * len(ids)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = set(assistant[-1:] if train_on == "last" else assistant)
    mask = [0] * len(ids)
    for start, stop, i, part in spans:
        if i in chosen and part in ("content", "eot"):
            mask[start:stop] = [1] * (stop - start)
    return ids, mask
