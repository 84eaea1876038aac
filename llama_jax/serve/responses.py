"""From engine events to HTTP responses: the choices being produced, the bridge from the
engine to the event loop, and the two response kinds (server-sent events; JSON when done),
both of which cancel the engine work when the client goes away.

  Choice      one choice's text (detokenised, cut at stop strings), ids and logprobs.
  Job         the engine requests of one HTTP request; events arrive on the event loop.
  Stream      text/event-stream from an async iterator of chunks, ending the request on
              disconnect.
  Deferred    a JSON response computed when the job is done, cancelled on disconnect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.responses import Response

from llama_jax.inference.text_stream import TextStream
from llama_jax.serve.protocol import ServeError, bad
from llama_jax.serve.requests import (
    EngineClosed,
    Finished,
    PromptLogprobs,
    QueueFull,
    Request,
    Token,
)


# ----------------------------------------------------------------------------- choices
class Choice:
    """One choice being produced: its text (via TextStream, cut at stop strings), its token
    ids and logprob entries, and why it ended."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.stream = TextStream(tokenizer, stop)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = []
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    def push(self, event: Token) -> str:
        """Adds a token; returns the text that can be shown now."""
        if self.stream.stopped:
            return ""
        self.tokens.append(event.id)
        if event.logprob is not None:
            self.logprobs.append((event.id, event.logprob, event.top))
        piece = self.stream.push([event.id])
        self.text.append(piece)
        return piece

    def end(self, event: Finished) -> str:
        """Records the end; returns the rest of the text."""
        if self.stream.stopped:
            self.finish_reason = "stop"  # a stop string: the cancel came from us
            return ""
        self.finish_reason = {"cancelled": "stop"}.get(event.reason, event.reason)
        self.error = event.error
        rest = self.stream.finish()
        self.text.append(rest)
        return rest


# ----------------------------------------------------------------------------- jobs
class Job:
    """The engine requests of one HTTP request. Their events are delivered on the event loop
    (see `ServeApp.deliver`) into one queue that `events()` reads."""

    def __init__(self, engine: Any, tokenizer: Any, requests: list[Request], stop: Sequence[str]):
        self.n = requests[0].n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(tokenizer, stop) for _ in range(len(requests) * self.n)]
        self.prompt_logprobs: list[PromptLogprobs | None] = [None] * len(requests)
        self.prompt_tokens = sum(len(r.prompt) for r in requests)
        self.handles = []
        try:
            for j, r in enumerate(requests):
                self.handles.append(engine.submit(r, self._putter(j)))
        except QueueFull as e:
            self.cancel()
            raise ServeError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from e
        except EngineClosed as e:
            self.cancel()
            raise ServeError(503, str(e), "server_error") from e
        except ValueError as e:
            self.cancel()
            raise bad(str(e)) from e
        self.open = len(self.choices)

    def _putter(self, j: int) -> Callable[[Any], None]:
        def put(event: Any) -> None:
            self.queue.put_nowait((j, event))

        return put

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, str, bool]]:
        """Yields (choice index, new text, whether a token was added) until every choice has
        ended; "" pieces too."""
        while self.open:
            j, event = await self.queue.get()
            if isinstance(event, PromptLogprobs):
                self.prompt_logprobs[j] = event
                continue
            index = j * self.n + event.choice
            choice = self.choices[index]
            if isinstance(event, Token):
                was_stopped = choice.stream.stopped
                piece = choice.push(event)
                if choice.stream.stopped and not was_stopped:
                    self.handles[j].cancel(event.choice)  # a stop string: free the slot now
                yield index, piece, not was_stopped
            else:
                piece = choice.end(event)
                self.open -= 1
                yield index, piece, False

    def usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def error(self) -> ServeError | None:
        for c in self.choices:
            if c.finish_reason == "error":
                return ServeError(500, f"generation failed: {c.error}", "server_error")
        return None


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ----------------------------------------------------------------------------- responses
async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # other messages (request body chunks) carry nothing for us


async def _unless_disconnected(receive, work: Callable[[], Awaitable[Any]]) -> Any:
    """Awaits `work()`; if the client disconnects first, cancels it and returns None."""
    result = None
    async with anyio.create_task_group() as tg:

        async def watch():
            await _until_disconnect(receive)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await work()
        finally:
            tg.cancel_scope.cancel()
    return result


class Stream(Response):
    """Server-sent events from `chunks`, cancelling the engine work when the client leaves."""

    def __init__(self, chunks: AsyncIterator[bytes], cancel: Callable[[], None]):
        self.chunks, self.cancel = chunks, cancel

    async def __call__(self, scope, receive, send):
        async def pump():
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                        ],
                    }
                )
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away while we wrote

        try:
            await _unless_disconnected(receive, pump)
        finally:
            self.cancel()  # no-op when every choice has finished
            await self.chunks.aclose()


class Deferred(Response):
    """A JSON response computed by `result`, cancelled if the client leaves first."""

    def __init__(self, result: Awaitable[Response], cancel: Callable[[], None]):
        self.result, self.cancel = result, cancel

    async def __call__(self, scope, receive, send):
        async def compute():
            return await self.result

        try:
            response = await _unless_disconnected(receive, compute)
        finally:
            self.cancel()
        if response is not None:
            await response(scope, receive, send)
