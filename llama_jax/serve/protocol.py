"""The OpenAI request side: field validation, OpenAI's JSON error shape, token text.

Each check names the field, the value given and what is valid; every error is a `ServeError`
that the app answers as {"error": {"message", "type", "param", "code"}} with its status.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

from starlette.responses import JSONResponse

from llama_jax.inference.sampler import SamplingParams

MAX_REQUEST_BYTES = 1 << 21  # 2 MiB of JSON
MAX_STOP = 16  # stop strings per request
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Accepted only with their neutral value: clients send them, the engine has no such feature.
_NEUTRAL = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (False, True),
    "response_format": ({"type": "text"},),
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "best_of",
    *_NEUTRAL,
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


# ----------------------------------------------------------------------------- errors
class ServeError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param=param)


# ----------------------------------------------------------------------------- validation
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(body: dict, name: str, default: Any = None) -> Any:
    v = body.get(name)
    return default if v is None else v


def int_field(body: dict, name: str, default: Any, low: int, high: int) -> Any:
    v = _get(body, name, default)
    if v is default:
        return v
    if not is_int(v) or not low <= v <= high:
        raise bad(f"{name}={json.dumps(v)}; valid: an integer in [{low}, {high}]", name)
    return v


def check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    for name in sorted(body):
        if name not in allowed:
            raise bad(f"unrecognized request argument supplied: {name}", name)
    for name, neutral in _NEUTRAL.items():
        v = body.get(name)
        if v is not None and not any(v == x and type(v) is type(x) for x in neutral):
            valid = " or ".join(json.dumps(x) for x in neutral)
            raise bad(f"{name}={json.dumps(v)} is not supported; valid: {valid} or null", name)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad(f"user={json.dumps(user)}; valid: a string", "user")
    return body


def sampling(body: dict, max_n: int) -> tuple[SamplingParams, int, int, tuple[str, ...]]:
    """(SamplingParams, seed, n, stop strings) from the common fields."""
    t = _get(body, "temperature", 1.0)
    if not _is_number(t) or t < 0:
        raise bad(f"temperature={json.dumps(t)}; valid: a number >= 0 (0 is greedy)", "temperature")
    p = _get(body, "top_p", 1.0)
    if not _is_number(p) or not 0 < p <= 1:
        raise bad(f"top_p={json.dumps(p)}; valid: a number in (0, 1]", "top_p")
    k = _get(body, "top_k", 0)
    if not is_int(k) or k < -1:
        raise bad(f"top_k={json.dumps(k)}; valid: an integer >= 0 (0 or -1: no limit)", "top_k")
    m = _get(body, "min_p", 0.0)
    if not _is_number(m) or not 0 <= m < 1:
        raise bad(f"min_p={json.dumps(m)}; valid: a number in [0, 1)", "min_p")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)  # unseeded requests differ, as OpenAI's do
    elif not is_int(seed) or not 0 <= seed < 2**32:
        raise bad(f"seed={json.dumps(seed)}; valid: an integer in [0, 2**32)", "seed")
    n = int_field(body, "n", 1, 1, max_n)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad(f"best_of={json.dumps(best_of)} is not supported; valid: null or n", "best_of")
    stop = _get(body, "stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if (
        not isinstance(stop, (list, tuple))
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad(
            f"stop={json.dumps(stop)}; valid: a non-empty string or a list of at most "
            f"{MAX_STOP} non-empty strings",
            "stop",
        )
    for name in ("stream",):
        v = body.get(name)
        if v is not None and not isinstance(v, bool):
            raise bad(f"{name}={json.dumps(v)}; valid: true or false", name)
    opts = body.get("stream_options")
    if opts is not None and (
        not isinstance(opts, dict)
        or set(opts) - {"include_usage"}
        or not isinstance(opts.get("include_usage", False), bool)
    ):
        raise bad(
            f'stream_options={json.dumps(opts)}; valid: {{"include_usage": true|false}}',
            "stream_options",
        )
    return SamplingParams(float(t), 0 if k == -1 else k, float(p), float(m)), seed, n, tuple(stop)


# ----------------------------------------------------------------------------- text helpers
def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as text; a token that is not whole UTF-8 is written as OpenAI does, bytes:\\xNN."""
    raw = tokenizer.decode_bytes([token_id])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
