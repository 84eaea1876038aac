"""Text on top of token generation: streaming detokenisation, stop strings, chat.

TextStream    incremental detokenisation that never splits a UTF-8 character and ends the
              text before the first stop string.
generate_text, stream_text, run_chat   what `Llama3.generate/stream/chat` call.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax

from llama_jax.inference.sampler import Generation, Sampler, SamplingParams

Array = jax.Array


# ----------------------------------------------------------------------------- text
class TextStream:
    """Token ids in, text pieces out: never splits a UTF-8 character, and ends the text before
    the first stop string (holding back any tail that may still grow into one).

    `push(ids)` returns the text that is now certain; `finish()` returns the rest. Their
    concatenation equals `tokenizer.decode(ids)` cut before the first stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """Adds generated ids; returns the text that can be shown now (maybe "").

        Args:
          ids: the next token ids.
          final: no more ids follow: flush an incomplete character (as U+FFFD) and the
            held-back tail.
        """
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._tokenizer.decode_bytes(list(ids)), final)
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            piece, self._pending = self._pending[:cut], ""
            return piece
        hold = 0 if final else _stop_prefix_len(self._pending, self._stop)
        piece = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(piece) :]
        return piece

    def finish(self) -> str:
        """Returns the rest of the text once generation has ended."""
        return self.push((), final=True)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalises `stop` (None, a string or a list of strings) to a tuple of strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strs, got {s!r}")
    return stop


def generate_text(
    sampler: Sampler,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_ids: Iterable[int] = (),
    truncate: bool = False,
    chunk: int = 16,
) -> list[str]:
    """Continues token prompts and returns the new text of each, ended before a stop string.

    Without stop strings the whole generation is one device loop; with them, the host looks
    at the text every `chunk` steps (rounded up to a multiple of the sampler's decode_chunk,
    the steps one loop iteration makes) and stops the rows that produced one.
    """
    k = sampler.decode_chunk
    chunk = -(-chunk // k) * k
    gen = Generation(sampler, prompts, max_new_tokens, sampling, seed, stop_ids, truncate)
    streams = [TextStream(tokenizer, stop) for _ in gen.tokens]
    pieces: list[list[str]] = [[] for _ in gen.tokens]
    new = [list(t) for t in gen.tokens]
    while True:
        for r, ids in enumerate(new):
            if ids and not streams[r].stopped:
                pieces[r].append(streams[r].push(ids))
                if streams[r].stopped:
                    gen.stop([r])
        if gen.done:
            break
        new = gen.advance(chunk if stop else max_new_tokens)
    return ["".join(p) + s.finish() for p, s in zip(pieces, streams)]


def stream_text(
    sampler: Sampler,
    tokenizer: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_ids: Iterable[int] = (),
    truncate: bool = False,
) -> Iterator[str]:
    """Yields the continuation of one token prompt as text pieces, one loop iteration at a time.

    Each device call runs one iteration of the generation loop: `sampler.decode_chunk` steps
    (one on CPU; several on a GPU, where that amortises the loop's fixed cost per iteration,
    and a few ms of delivery latency goes unnoticed by a reader). The tokens do not depend on
    it, so the pieces concatenate to `generate_text`'s result for the same arguments.
    """
    gen = Generation(sampler, [prompt], max_new_tokens, sampling, seed, stop_ids, truncate)
    stream = TextStream(tokenizer, stop)
    new = list(gen.tokens[0])
    while True:
        if new:
            piece = stream.push(new)
            if piece:
                yield piece
            if stream.stopped:
                return
        if gen.done:
            break
        new = gen.advance(sampler.decode_chunk)[0]
    rest = stream.finish()
    if rest:
        yield rest


def check_dialog_fits(ids: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    """Raises one line when a rendered dialog and its reply cannot fit the model's context.

    A dialog is never truncated from the front (that would cut the system prompt and the
    template's opening), so the error says what to shorten instead.
    """
    if len(ids) + max_new_tokens > max_seq_len:
        raise ValueError(
            f"the dialog renders to {len(ids)} tokens in the chat format; with max_new_tokens="
            f"{max_new_tokens} that is more than the model's context (max_seq_len={max_seq_len})"
            ": lower max_new_tokens (--max_new_tokens), or drop early turns (/reset in llama3 "
            "chat; truncate=True in Llama3.chat keeps the last tokens)"
        )


def run_chat(
    model: Any,
    lines: Iterable[str],
    write: Callable[[str], Any],
    system: str | None = None,
    prompt: str = "",
    errors: list[str] | None = None,
    **kwargs: Any,
) -> list[Mapping[str, str]]:
    """An interactive chat: each line is a user turn; the reply is streamed to `write`.

    `/reset` forgets the conversation (keeping the system prompt), `/exit` ends it, as does
    the end of `lines`. When the conversation and `max_new_tokens` outgrow the model's
    context, the oldest whole turns (user + reply) are dropped, never the system prompt or
    the new turn, with a note; if those alone do not fit, the turn fails (or, with
    `truncate=True`, loses its oldest tokens).

    Args:
      model: a `Llama3` (dialogs in its chat format: `Tokenizer.encode_dialog`).
      lines: user input, one turn per line (e.g. sys.stdin).
      write: where output goes (e.g. sys.stdout.write); flushed by the caller's stream.
      system: an optional system prompt.
      prompt: written before reading each line (e.g. "> " on a terminal).
      errors: if given, each failed turn's message is appended (the CLI exits non-zero).
      **kwargs: generation arguments for `model.stream`.

    Returns:
      The conversation when the chat ended.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    sp = kwargs.get("sampling") or SamplingParams()
    max_new = kwargs.get("max_new_tokens", sp.max_new_tokens)
    flush = getattr(write, "__self__", None)
    write(prompt)
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            write("[conversation reset]\n")
        elif command:
            messages.append({"role": "user", "content": text})
            reply = []
            try:
                budget = model.config.max_seq_len - max_new
                ids, dropped = fit_dialog(model.tokenizer, messages, budget, len(start))
                if dropped:
                    del messages[len(start) : len(start) + dropped]
                    write(f"[dropped the {dropped // 2} oldest turn(s) to fit the context]\n")
                if not kwargs.get("truncate", getattr(sp, "truncate", False)):
                    check_dialog_fits(ids, max_new, model.config.max_seq_len)
                for piece in model.stream(ids, **kwargs):
                    reply.append(piece)
                    write(piece)
                    if hasattr(flush, "flush"):
                        flush.flush()
            except ValueError as e:
                messages.pop()
                write(f"[error: {e}]")
                if errors is not None:
                    errors.append(str(e))
            else:
                messages.append({"role": "assistant", "content": "".join(reply)})
            write("\n")
        write(prompt)
    return messages


def fit_dialog(
    tokenizer: Any, messages: list[Mapping[str, str]], budget: int, keep_head: int = 0
) -> tuple[list[int], int]:
    """(ids, n): the dialog's ids once its `n` oldest messages after the first `keep_head`
    (the system prompt) are dropped, whole user + assistant pairs at a time, until the ids fit
    `budget` tokens or only the head and the last turn are left."""
    dropped = 0
    ids = tokenizer.encode_dialog(messages)
    while len(ids) > budget and len(messages) - dropped - keep_head > 1:
        dropped += 2
        ids = tokenizer.encode_dialog(messages[:keep_head] + messages[keep_head + dropped :])
    return ids, dropped
