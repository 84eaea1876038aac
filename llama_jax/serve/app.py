"""The OpenAI-compatible HTTP app over an `Engine` (Starlette, served by uvicorn).

  GET  /health                liveness, slots in use, queue length (no API key needed)
  GET  /v1/models             the one served model
  POST /v1/completions        text or token-id prompts (one or a list); echo, logprobs, n, stream
  POST /v1/chat/completions   the model's chat format (Tokenizer.encode_dialog); stream as SSE

Starlette rather than FastAPI: the request bodies are validated here by hand, so that every
error is OpenAI's JSON error shape with a message naming the field and what is valid
(FastAPI's pydantic layer answers 422 in its own shape), and the two streaming responses watch
the connection themselves, so a client that goes away cancels its request and frees its slot.

Errors: 400 invalid request, 401 missing/wrong API key, 404 unknown model or path, 405 wrong
method, 413 body over the size limit, 429 queue full, 500 engine failure, 503 shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llama_jax.serve.engine import Engine
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
from llama_jax.serve.requests import TOP_LOGPROBS, Request
from llama_jax.serve.responses import Deferred, Job, Stream, sse
from llama_jax.tokenizer.base import adds_bos


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
        self._loop: asyncio.AbstractEventLoop | None = None
        engine.deliver = self.deliver

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
        self._loop = self._loop or asyncio.get_running_loop()
        await self.starlette(scope, receive, send)

    def deliver(self, batch: Callable[[], None]) -> None:
        """The engine's batches of events run on the event loop, one hand-over per step:
        callbacks, detokenisation and streaming stay off the engine thread."""
        loop = self._loop
        if loop is None:
            batch()  # no request has come in yet, so the batch holds no one's events
            return
        with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): no one listens
            loop.call_soon_threadsafe(batch)

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
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > self.max_request_bytes:
                    raise ServeError(
                        413, f"request body over {self.max_request_bytes} bytes; send less"
                    )
        except ClientDisconnect:  # gone, or closed by the body deadline (serve/connections.py)
            raise ServeError(408, "the request body did not arrive in time") from None
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from e
        except RecursionError:  # json's decoder recurses once per level
            body = None
        if body is None and data.strip() != b"null" or _depth_over(body, MAX_JSON_DEPTH):
            raise bad(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        return body

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
        bos = adds_bos(tok)  # as Llama3.generate (SmolLM2's GGUF: no BOS)
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                out.append((tok.encode(p, bos=bos), p))
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
        job = Job(self.engine, self.tokenizer, requests, stop)
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
            return Stream(
                self._completion_chunks(job, head, echoes, echo, include_usage), job.cancel
            )
        return Deferred(self._completion_result(job, head, echoes, echo, prompts), job.cancel)

    def _completion_logprobs(self, job: Job, j: int, index: int, start: int, prompt_ids) -> dict:
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
                yield sse(job.error().body())
                continue
            yield sse({**head, "choices": [choice]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": job.usage()})
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
        job = Job(self.engine, self.tokenizer, [request], stop)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            head["object"] = "chat.completion.chunk"
            return Stream(self._chat_chunks(job, head, include_usage), job.cancel)
        return Deferred(self._chat_result(job, head), job.cancel)

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

    async def _chat_result(self, job: Job, head: dict) -> Response:
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

    async def _chat_chunks(self, job: Job, head: dict, include_usage: bool) -> AsyncIterator[bytes]:
        k = job.handles[0].request.logprobs
        for i in range(len(job.choices)):
            delta = {"role": "assistant", "content": ""}
            yield sse(
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
                yield sse(job.error().body())
                continue
            logprobs = None
            if k is not None and added:
                logprobs = self._chat_logprobs(c.logprobs[-1:], k)
            if not piece and logprobs is None and c.finish_reason is None:
                continue
            delta = {"content": piece} if piece else {}
            yield sse(
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
            yield sse({**head, "choices": [], "usage": job.usage()})
        yield b"data: [DONE]\n\n"


MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 levels (messages -> content parts -> ...)


def _depth_over(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False
