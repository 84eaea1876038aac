"""Few-shot prompts: k solved examples before the question, chosen with a fixed seed.

`fewshot_prompt` renders plain text (examples joined by a blank line, as lm-eval's default
`fewshot_delimiter`); with `chat=True` it renders the model's chat format instead (each example
a user turn and an assistant turn, the question a last user turn, then the assistant header),
for instruct models. The examples are drawn from a separate pool (the task's few-shot split),
never from the evaluated items, with `random.Random(seed)`, so a run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def choose_examples(pool: Sequence[Any], k: int, seed: int = 1234) -> list[Any]:
    """k examples from `pool`, the same for the same seed (lm-eval's default seed is 1234)."""
    if k < 0:
        raise ValueError(f"num_fewshot={k}; valid: an int >= 0")
    if k > len(pool):
        raise ValueError(f"num_fewshot={k}, but the few-shot pool has only {len(pool)} examples")
    return random.Random(seed).sample(list(pool), k)


def fewshot_prompt(
    examples: Sequence[tuple[str, str]],
    question: str,
    tokenizer: Any = None,
    chat: bool = False,
    system: str | None = None,
    delimiter: str = "\n\n",
) -> str | list[int]:
    """The prompt for `question` after the solved `examples` [(prompt, answer), ...].

    Returns:
      text (plain), or token ids of the chat rendering (chat=True; needs `tokenizer`).
    """
    if not chat:
        shots = "".join(f"{p}{a}{delimiter}" for p, a in examples)
        return shots + question
    if tokenizer is None:
        raise ValueError("chat=True needs the tokenizer (for the chat format)")
    messages = [{"role": "system", "content": system}] if system else []
    for p, a in examples:
        messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]
    messages.append({"role": "user", "content": question})
    return tokenizer.encode_dialog(messages)
