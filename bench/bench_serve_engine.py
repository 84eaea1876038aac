"""Where one client's time goes in `llama3 serve`, in process (issue 23, item 12).

On one prompt and the same settings (greedy, `--max_tokens` new tokens), interleaved rounds,
medians printed:

  generate   `Llama3.generate_ids` on the prompt (what one client should get within 10% of);
  engine     the `Engine` alone (no HTTP): submit, wait for `Finished` (events delivered on the
             engine thread), with the engine thread's time split into admit (the prefill +
             insert dispatch), step dispatch, the [k, B, 2] read (includes the wait for the
             device), the rest of its Python, and finishing (from the last read to `Finished`);
  http       the same request through the live server (`openai` client in its own process,
             as bench_serve.py does), streamed.

Then the compiled per-token costs, each timed directly in a loop with block_until_ready: the
engine's step at one slot, the Sampler's `decode_step`, and generate's on-device loop per token
(generate_ids of N tokens minus that of 1, over N - 1).

  PYTHONPATH=. python bench/bench_serve_engine.py                # the README demo's shape
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import collections
import contextlib
import dataclasses
import os
import sys
import threading
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_sampling import random_params  # noqa: E402
from bench_serve import MODELS, SLOTS, _clients, _IdTokenizer, _prompts  # noqa: E402

from llama_jax import Llama3  # noqa: E402
from llama_jax.serve.app import ServeApp  # noqa: E402
from llama_jax.serve.engine import Engine  # noqa: E402
from llama_jax.serve.requests import Finished, Request, Token  # noqa: E402
from llama_jax.serve.server import ServerThread  # noqa: E402
from llama_jax.serve.slots import pack_rows  # noqa: E402


class _Timeline:
    """Wraps the engine's calls to record (name, start, end) on its thread."""

    def __init__(self, engine: Engine):
        self.marks: list[tuple[str, float, float]] = []
        for obj, name in ((engine.slots, "admit"), (engine.slots, "step"), (engine, "_collect")):
            self._wrap(obj, name)

    def _wrap(self, obj, name):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.marks.append((name, t, time.perf_counter()))

        setattr(obj, name, timed)


def _engine_request(engine: Engine, timeline: _Timeline, prompt, max_tokens) -> dict:
    """One request through the engine alone; its time split (seconds)."""
    done = threading.Event()
    ids: list[int] = []
    end = [0.0]

    def on_event(event):
        if isinstance(event, Token):
            ids.append(event.id)
        elif isinstance(event, Finished):
            end[0] = time.perf_counter()
            done.set()

    timeline.marks.clear()
    t0 = time.perf_counter()
    engine.submit(Request(list(prompt), max_tokens), on_event)
    done.wait()
    time.sleep(0.05)  # the engine thread's trailing read of the step in flight
    assert len(ids) == max_tokens, ids
    marks = [m for m in timeline.marks if m[1] < end[0]]
    by = collections.defaultdict(float)
    for name, a, b in marks:
        by[name] += b - a
    admit = [m for m in marks if m[0] == "admit"]
    collects = [m for m in marks if m[0] == "_collect"]
    total = end[0] - t0
    return {
        "total": total,
        "wake": admit[0][1] - t0,  # submit -> the engine thread starts admitting
        "admit": by["admit"],
        "steps": sum(m[0] == "step" for m in marks),
        "step dispatch": by["step"],
        "read (incl. wait)": by["_collect"],
        "other python": (collects[-1][2] - admit[0][1]) - sum(by.values()),
        "finish": end[0] - collects[-1][2],
        "ids": ids,
    }


def _per_token_costs(model, sampler, prompt, max_tokens, reps) -> dict:
    """Compiled costs per token (ms), each on its own, block_until_ready each call."""
    out = {}
    # The engine's step at one slot (a separate, unstarted engine: its slots are ours).
    engine = Engine(sampler, SLOTS, MODELS_LEN[0])
    slots = engine.slots
    req = Request(list(prompt), max_tokens)
    slots.admit(*pack_rows([(0, req, 0)], 1, _bucket(len(prompt) - 1, engine), SLOTS))
    for _ in range(3):
        slots.step()[0].block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        slots.step()[0].block_until_ready()
    out["engine step, 1 slot, waited"] = (time.perf_counter() - t) / reps * 1e3
    t = time.perf_counter()
    prev = slots.step()[0]
    for _ in range(reps):
        nxt = slots.step()[0]
        np.asarray(prev)
        prev = nxt
    np.asarray(prev)
    out["engine step, 1 slot, pipelined (as the loop)"] = (time.perf_counter() - t) / reps * 1e3
    t = time.perf_counter()
    for _ in range(reps):
        slots.step()
    jax.block_until_ready(slots.state)
    out["engine step, 1 slot, dispatch only then one wait"] = (time.perf_counter() - t) / reps * 1e3
    # The Sampler's decode step (host token in, logits out), cache of 64 and generate's bucket.
    for cache_len in sorted({MODELS_LEN[0], _gen_cache_len(sampler, prompt, max_tokens)}):
        tokens = np.array([prompt], np.int32)
        _, cache = sampler.prefill(tokens, [len(prompt)], cache_len)
        pos = np.array([len(prompt)], np.int32)
        tok = np.array([1], np.int32)
        for _ in range(3):
            logits, cache = sampler.decode_step(cache, tok, pos)
        logits.block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            logits, cache = sampler.decode_step(cache, tok, pos)
            logits.block_until_ready()
        out[f"Sampler.decode_step, cache {cache_len}"] = (time.perf_counter() - t) / reps * 1e3
    # generate's on-device loop: (N tokens - 1 token) / (N - 1).
    times = collections.defaultdict(list)
    for _ in range(max(3, reps // 20)):
        for n in (1, max_tokens):
            t = time.perf_counter()
            model.generate_ids([prompt], max_new_tokens=n, temperature=0)
            times[n].append(time.perf_counter() - t)
    one, full = np.median(times[1]), np.median(times[max_tokens])
    out["generate loop per token"] = (full - one) / (max_tokens - 1) * 1e3
    out["generate_ids of 1 token (prefill + fixed)"] = one * 1e3
    return out


MODELS_LEN = [64]


def _bucket(n, engine):
    from llama_jax.inference.sampler import bucket

    return bucket(n, engine.max_seq_len)


def _gen_cache_len(sampler, prompt, max_tokens):
    from llama_jax.inference.sampler import bucket, length_bucket

    limit = sampler.config.max_seq_len
    return bucket(length_bucket(len(prompt), limit) + max_tokens, limit)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--max_seq_len", type=int, default=64, help="positions per slot")
    p.add_argument("--max_tokens", type=int, default=24)
    p.add_argument("--prompt_median", type=int, default=24)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=200, help="calls per per-token cost")
    p.add_argument("--no_http", action="store_true")
    p.add_argument("--plain_http", action="store_true", help="also the lightest client (plain "
                   "httpx in its own process, serve_clients.py), streamed and not")  # fmt: skip
    p.add_argument("--decode_chunks", default="1", help="engines side by side, one per "
                   "decode_chunk (decode steps per device call), e.g. 1,4")  # fmt: skip
    args = p.parse_args()
    chunks = [int(k) for k in args.decode_chunks.split(",")]
    MODELS_LEN[0] = args.max_seq_len
    config = dataclasses.replace(MODELS[args.model], max_seq_len=args.max_seq_len)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}; model {args.model} {config.param_count() / 1e6:.1f}M "
          f"{config.dtype}; {SLOTS} slots of {args.max_seq_len}; {args.max_tokens} new tokens, "
          "greedy", flush=True)  # fmt: skip
    model = Llama3(config=config, params=random_params(config), dtype=None,
                   tokenizer=_IdTokenizer(config.vocab_size))  # fmt: skip
    prompt = _prompts(config, 1, args.max_tokens, args.prompt_median, args.max_seq_len)[0]
    print(f"prompt: {len(prompt)} tokens", flush=True)
    sampler = model.sampler()
    n = args.max_tokens
    ref = model.generate_ids([prompt], max_new_tokens=n, temperature=0)[0]  # compiles
    engines, timelines = {}, {}
    for k in chunks:
        engines[k] = Engine(sampler, SLOTS, args.max_seq_len, decode_chunk=k)
        # Each size's step compiled and timed as `llama3 serve`'s warm-up does (which decides
        # the one-slot steps a call: serve/slots.py LONE_CHUNK); prefills compile on first use.
        engines[k].slots.warmup([])
        print(
            f"decode_chunk {k}: steps a call by slot count {engines[k].slots.chunks}, "
            f"cache prefixes {engines[k].slots.spans}"
        )
        timelines[k] = _Timeline(engines[k])
        engines[k].start()
        got = _engine_request(engines[k], timelines[k], prompt, n)["ids"]  # compiles
        assert got == ref, (k, got, ref)
    rows = collections.defaultdict(list)
    with contextlib.ExitStack() as stack:
        servers = {
            k: stack.enter_context(ServerThread(ServeApp(e, model.tokenizer, "bench")))
            for k, e in engines.items()
        }
        if not args.no_http:
            for srv in servers.values():
                _clients(srv.url, [prompt], n, 1, 0)
        for _ in range(args.rounds):
            t = time.perf_counter()
            model.generate_ids([prompt], max_new_tokens=n, temperature=0)
            rows["generate"].append(time.perf_counter() - t)
            for k, engine in engines.items():
                tag = f"[k={k}] " if len(chunks) > 1 else ""
                for key, v in _engine_request(engine, timelines[k], prompt, n).items():
                    if key != "ids":
                        rows[f"{tag}engine {key}"].append(v)
                if not args.no_http:
                    lat = _clients(servers[k].url, [prompt] * 4, n, 1, 0)[2]
                    rows[f"{tag}http, streamed (client's latency)"].append(float(np.median(lat)))
                if args.plain_http:
                    for stream in (False, True):
                        lat = _clients(servers[k].url, [prompt] * 4, n, 1, 0, stream, "httpx")[2]
                        name = f"{tag}plain httpx, {'streamed' if stream else 'not streamed'}"
                        rows[name].append(float(np.median(lat)))
    print(f"\nper request, medians of {args.rounds} interleaved rounds (ms):")
    gen = np.median(rows["generate"])
    for k, v in rows.items():
        m = np.median(v)
        extra = ""
        if k == "generate" or k.endswith("engine total") or "http" in k:
            extra = f"   {n / m:6.1f} tok/s  {gen / m:4.2f}x generate"
        if k.endswith("engine steps"):
            print(f"  {k:<46} {m:8.0f}")
            continue
        print(f"  {k:<46} {m * 1e3:8.2f}{extra}")
    for engine in engines.values():
        engine.close()
    print("\ncompiled per-token costs (ms), means over --reps calls:")
    for k, v in _per_token_costs(model, sampler, prompt, n, args.reps).items():
        print(f"  {k:<50} {v:7.3f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
