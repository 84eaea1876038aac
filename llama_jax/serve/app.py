"""The OpenAI-compatible HTTP app over an `Engine` (Starlette, served by uvicorn).

  GET  /health                liveness, slots in use, queue length (no API key needed)
  GET  /v1/models             the one served model
  POST /v1/completions        text or token-id prompts (one or a list); echo, logprobs, n, stream
  POST /v1/chat/completions   the Llama 3 chat format; stream as server-sent events

Starlette rather than FastAPI: the request bodies are validated here by hand, so that every
error is OpenAI's JSON error shape with a message naming the field and what is valid
(FastAPI's pydantic layer answers 422 in its own shape), and the two streaming responses watch
the connection themselves, so a client that goes away cancels its request and frees its slot.

Errors: 400 invalid request, 401 missing/wrong API key, 404 unknown model or path, 405 wrong
method, 413 body over the size limit, 429 queue full, 500 engine failure, 503 shutting down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llama_jax.serve.engine import (
    TOP_LOGPROBS,
    Engine,
    EngineClosed,
    Finished,
    PromptLogprobs,
    QueueFull,
    Request,
    Token,
)
from llama_jax.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    COMPLETION_FIELDS,
    MAX_REQUEST_BYTES,
    ServeError,
    bad,
    check_fields,
    int_field,
    is_int,
    sampling,
    token_text,
)
from llama_jax.text_stream import TextStream


# ----------------------------------------------------------------------------- choices
class _Choice:
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


# ----------------------------------------------------------------------------- the app
class _Job:
    """The engine requests of one HTTP request, their events bridged to the event loop."""

    def __init__(self, app: ServeApp, requests: list[Request], stop: Sequence[str]):
        self.app = app
        self.n = requests[0].n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice(app.tokenizer, stop) for _ in range(len(requests) * self.n)]
        self.prompt_logprobs: list[PromptLogprobs | None] = [None] * len(requests)
        self.prompt_tokens = sum(len(r.prompt) for r in requests)
        self.handles = []
        loop = asyncio.get_running_loop()
        try:
            for j, r in enumerate(requests):
                put = self._putter(loop, j)
                self.handles.append(app.engine.submit(r, put))
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

    def _putter(self, loop: asyncio.AbstractEventLoop, j: int) -> Callable[[Any], None]:
        def put(event: Any) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (j, event))

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


class ServeApp:
    """The ASGI app: `ServeApp(engine, tokenizer, ...)` is what uvicorn serves."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        model_name: str = "llama_jax",
        api_key: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key or None
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", ()))

        async def http_error(request, exc: HTTPException):
            if exc.status_code == 404:
                return ServeError(
                    404, f"no such path: {request.url.path}", code="not_found"
                ).response()
            if exc.status_code == 405:
                return ServeError(
                    405, f"method {request.method} is not allowed on {request.url.path}"
                ).response()
            return ServeError(exc.status_code, str(exc.detail)).response()

        async def server_error(request, exc: Exception):
            return ServeError(
                500, f"internal error: {type(exc).__name__}", "server_error"
            ).response()

        self.starlette = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ],
            exception_handlers={HTTPException: http_error, Exception: server_error},
        )

    async def __call__(self, scope, receive, send):
        await self.starlette(scope, receive, send)

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ServeError(
                401,
                "missing API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ServeError(401, "incorrect API key provided", code="invalid_api_key")

    async def _body(self, request: HTTPRequest) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise ServeError(
                413, f"request body of {length} bytes; valid: at most {self.max_request_bytes}"
            )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_request_bytes:
                raise ServeError(
                    413, f"request body over {self.max_request_bytes} bytes; send less"
                )
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from e

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad(f"model={json.dumps(model)}; valid: a string", "model")
        if model is not None and model != self.model_name:
            raise ServeError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _handle(self, request: HTTPRequest, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            self._authorize(request)
            return await fn(await self._body(request))
        except ServeError as e:
            return e.response()

    # ------------------------------------------------------------------ endpoints
    async def health(self, request: HTTPRequest) -> Response:
        e = self.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_name,
                "active": e.active,
                "pending": e.pending,
                "max_batch": e.max_batch,
                "max_queue": e.max_queue,
                "max_seq_len": e.max_seq_len,
            }
        )

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self._authorize(request)
        except ServeError as e:
            return e.response()
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "llama_jax",
            "max_model_len": self.engine.max_seq_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._handle(request, self._completions)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._handle(request, self._chat)

    # ------------------------------------------------------------------ /v1/completions
    def _prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """(token ids, echo text) per prompt: text gets BOS like `Llama3.generate`."""
        tok = self.tokenizer
        valid = "valid: a string, a list of strings, a list of token ids or a list of such lists"
        one_ids = isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)
        if isinstance(prompt, str) or one_ids:
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad(f"prompt={json.dumps(prompt)[:80]}; {valid}", "prompt")
        if len(prompt) > self.engine.max_queue:
            raise bad(
                f"{len(prompt)} prompts in one request; valid: at most {self.engine.max_queue}",
                "prompt",
            )
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                out.append((tok.encode(p, bos=True), p))
            elif isinstance(p, list) and p and all(is_int(t) for t in p):
                outside = [t for t in p if not 0 <= t < self.engine.vocab_size]
                if outside:
                    raise bad(
                        f"prompt {i} has token id {outside[0]}, outside the vocabulary "
                        f"[0, {self.engine.vocab_size})",
                        "prompt",
                    )
                out.append((list(p), tok.decode(p)))
            else:
                raise bad(f"prompt {i} is {json.dumps(p)[:80]}; {valid}", "prompt")
        return out

    async def _completions(self, body: Any) -> Response:
        body = check_fields(body, COMPLETION_FIELDS)
        self._check_model(body)
        sp, seed, n, stop = sampling(body, self.engine.max_batch)
        echo = body.get("echo") or False
        if not isinstance(echo, bool):
            raise bad(f"echo={json.dumps(echo)}; valid: true or false", "echo")
        logprobs = int_field(body, "logprobs", None, 0, TOP_LOGPROBS)
        max_tokens = int_field(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, 0, 2**31)
        prompts = self._prompts(body.get("prompt"))
        requests = [
            Request(
                ids,
                max_tokens,
                sp,
                seed,
                n,
                self.stop_ids,
                logprobs,
                prompt_logprobs=echo and (logprobs is not None or max_tokens == 0),
            )
            for ids, _ in prompts
        ]
        if max_tokens == 0 and not echo:
            raise bad(
                "max_tokens=0; valid: >= 1 (0 only with echo, to score the prompt)", "max_tokens"
            )
        job = _Job(self, requests, stop)
        ids_ = f"cmpl-{uuid.uuid4().hex}"
        head = {
            "id": ids_,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        echoes = [text for _, text in prompts]
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            return _Stream(
                self._completion_chunks(job, head, echoes, echo, include_usage), job.cancel
            )
        return _Deferred(self._completion_result(job, head, echoes, echo, prompts), job.cancel)

    def _completion_logprobs(self, job: _Job, j: int, index: int, start: int, prompt_ids) -> dict:
        """OpenAI's completions logprobs object, from text offset `start`."""
        choice = job.choices[index]
        entries: list[tuple[int, float | None, tuple]] = []
        if prompt_ids is not None and job.prompt_logprobs[j] is not None:
            pl = job.prompt_logprobs[j]
            entries += list(zip(prompt_ids, pl.logprobs, pl.top))
        entries += choice.logprobs
        return self._logprob_object(entries, start, job.handles[j].request.logprobs)

    def _logprob_object(self, entries, start: int, k: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = start
        for token_id, lp, top in entries:
            text = token_text(self.tokenizer, token_id)
            tokens.append(text)
            lps.append(lp)
            offsets.append(pos)
            pos += len(text)
            if lp is None:
                tops.append(None)
                continue
            d = {}
            for t, v in top[:k]:
                d.setdefault(token_text(self.tokenizer, t), v)
            d.setdefault(text, lp)
            tops.append(d)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    async def _completion_result(self, job, head, echoes, echo, prompts) -> Response:
        async for _ in job.events():
            pass  # the choices collect the text
        err = job.error()
        if err:
            return err.response()
        choices = []
        for index, c in enumerate(job.choices):
            j = index // job.n
            prefix = echoes[j] if echo else ""
            logprobs = None
            if job.handles[j].request.logprobs is not None:
                logprobs = self._completion_logprobs(
                    job, j, index, 0, prompts[j][0] if echo else None
                )
            choices.append(
                {
                    "index": index,
                    "text": prefix + "".join(c.text),
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
        return JSONResponse({**head, "choices": choices, "usage": job.usage()})

    async def _completion_chunks(
        self, job, head, echoes, echo, include_usage
    ) -> AsyncIterator[bytes]:
        sent_echo = set()
        k_of = [h.request.logprobs for h in job.handles]
        async for index, piece, added in job.events():
            j = index // job.n
            c = job.choices[index]
            text = piece
            logprobs = None
            if echo and index not in sent_echo:
                sent_echo.add(index)
                text = echoes[j] + text
            if k_of[j] is not None and added:
                logprobs = self._logprob_object([c.logprobs[-1]], 0, k_of[j])
            if not text and logprobs is None and c.finish_reason is None:
                continue
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
            if c.finish_reason == "error":
                yield _sse(job.error().body())
                continue
            yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": job.usage()})
        yield b"data: [DONE]\n\n"

    # ------------------------------------------------------------------ /v1/chat/completions
    def _messages(self, messages: Any) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad(f"messages[{i}] must be an object with a string role", "messages")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise bad(
                            f"messages[{i}].content: only text parts are supported", "messages"
                        )
                    if not isinstance(part.get("text"), str):
                        raise bad(
                            f"messages[{i}].content: a text part needs a string text", "messages"
                        )
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise bad(
                    f"messages[{i}].content={json.dumps(content)[:80]}; valid: a string or a list "
                    "of text parts",
                    "messages",
                )
            out.append({"role": m["role"], "content": content})
        return out

    async def _chat(self, body: Any) -> Response:
        body = check_fields(body, CHAT_FIELDS)
        self._check_model(body)
        sp, seed, n, stop = sampling(body, self.engine.max_batch)
        messages = self._messages(body.get("messages"))
        try:
            ids = self.tokenizer.encode_dialog(messages)
        except ValueError as e:
            raise bad(str(e), "messages") from e
        want_lp = body.get("logprobs") or False
        if not isinstance(want_lp, bool):
            raise bad(f"logprobs={json.dumps(want_lp)}; valid: true or false", "logprobs")
        top = int_field(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
        limit = self.engine.max_seq_len
        room = max(limit - len(ids), 1)
        max_tokens = int_field(body, "max_completion_tokens", None, 1, 2**31)
        if max_tokens is None:
            max_tokens = int_field(body, "max_tokens", room, 1, 2**31)
        request = Request(ids, max_tokens, sp, seed, n, self.stop_ids, top if want_lp else None)
        job = _Job(self, [request], stop)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            head["object"] = "chat.completion.chunk"
            return _Stream(self._chat_chunks(job, head, include_usage), job.cancel)
        return _Deferred(self._chat_result(job, head), job.cancel)

    def _chat_logprobs(self, entries, k: int) -> dict:
        def item(token_id, lp):
            raw = self.tokenizer.decode_bytes([token_id])
            return {
                "token": token_text(self.tokenizer, token_id),
                "logprob": lp,
                "bytes": list(raw),
            }

        content = []
        for token_id, lp, top in entries:
            content.append({**item(token_id, lp), "top_logprobs": [item(t, v) for t, v in top[:k]]})
        return {"content": content}

    async def _chat_result(self, job: _Job, head: dict) -> Response:
        async for _ in job.events():
            pass  # the choices collect the text
        err = job.error()
        if err:
            return err.response()
        k = job.handles[0].request.logprobs
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": None if k is None else self._chat_logprobs(c.logprobs, k),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(job.choices)
        ]
        return JSONResponse({**head, "choices": choices, "usage": job.usage()})

    async def _chat_chunks(
        self, job: _Job, head: dict, include_usage: bool
    ) -> AsyncIterator[bytes]:
        k = job.handles[0].request.logprobs
        for i in range(len(job.choices)):
            delta = {"role": "assistant", "content": ""}
            yield _sse(
                {
                    **head,
                    "choices": [
                        {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                    ],
                }
            )
        async for index, piece, added in job.events():
            c = job.choices[index]
            if c.finish_reason == "error":
                yield _sse(job.error().body())
                continue
            logprobs = None
            if k is not None and added:
                logprobs = self._chat_logprobs(c.logprobs[-1:], k)
            if not piece and logprobs is None and c.finish_reason is None:
                continue
            delta = {"content": piece} if piece else {}
            yield _sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": index,
                            "delta": delta,
                            "logprobs": logprobs,
                            "finish_reason": c.finish_reason,
                        }
                    ],
                }
            )
        if include_usage:
            yield _sse({**head, "choices": [], "usage": job.usage()})
        yield b"data: [DONE]\n\n"


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ----------------------------------------------------------------------------- responses
async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Stream(Response):
    """Server-sent events from `chunks`, cancelling the engine work when the client leaves."""

    def __init__(self, chunks: AsyncIterator[bytes], cancel: Callable[[], None]):
        self.chunks, self.cancel = chunks, cancel

    async def __call__(self, scope, receive, send):
        async def pump():
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

        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    await _until_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await pump()
                except OSError:
                    pass  # the client went away while we wrote
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self.cancel()  # no-op when every choice has finished
            await self.chunks.aclose()


class _Deferred(Response):
    """A JSON response computed by `result`, cancelled if the client leaves first."""

    def __init__(self, result: Awaitable[Response], cancel: Callable[[], None]):
        self.result, self.cancel = result, cancel

    async def __call__(self, scope, receive, send):
        response = None
        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    await _until_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    response = await self.result
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self.cancel()
        if response is not None:
            await response(scope, receive, send)
