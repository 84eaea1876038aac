"""`llama3 serve` under load: throughput and time to first token at 1, 4 and 16 concurrent
clients, against sequential requests to the same server and `transformers` `generate` batched
by hand, side by side in one run.

Method: a server (engine + HTTP app, uvicorn on 127.0.0.1) on a random model; R requests of a
fixed prompt length and `--new_tokens` greedy tokens each (token-id prompts; the model's random
ids never hit a stop id, so every request generates all its tokens), sent by `openai.AsyncOpenAI`
with at most C in flight, streamed, so that time to first token (TTFT) is when the first text
chunk arrives. Throughput = generated tokens / wall time of the R requests. "sequential" is
C = 1: one request after another to the same server, the denominator of the throughput ratios;
the single-client p99 TTFT is the denominator of the TTFT ratios. transformers: the same weights,
`generate` on one left-aligned batch of all R prompts (equal lengths, so no padding), the
throughput a hand-batched offline script gets. Prints numbers and ratios; never asserts on time.

  python bench/bench_serve.py --model tiny     # smoke test, ~2 minutes on 2 CPUs
  python bench/bench_serve.py --model small    # the ~50M model (PERF_NOTES)
  python bench/bench_serve.py --model 1b       # Llama-3.2-1B-shaped bfloat16
Goal (issue 12): at 16 clients >= 4x the sequential throughput, p99 TTFT < 2x the single one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time

import jax
import numpy as np
import openai
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sampling import SMALL, hf_model, random_params  # noqa: E402

from llama_jax import Llama3  # noqa: E402
from llama_jax.config import get_config  # noqa: E402
from llama_jax.serve.app import ServeApp  # noqa: E402
from llama_jax.serve.engine import Engine  # noqa: E402
from llama_jax.serve.server import ServerThread  # noqa: E402

MODELS = {
    "tiny": get_config("tiny", vocab_size=2048, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128),
    "small": SMALL,
    "1b": dataclasses.replace(
        get_config("llama3.2-1b"), param_dtype="bfloat16", dtype="bfloat16", max_seq_len=512
    ),
}


class _IdTokenizer:
    """Decodes ids as text for the server without a tokenizer file: each id is one word."""

    stop_ids: tuple[int, ...] = ()

    def decode_bytes(self, ids):
        return "".join(f" t{int(i)}" for i in ids).encode()

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


async def _clients(url, prompts, new_tokens, concurrency):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    ttfts, counts = [], []

    async def one(p):
        async with gate:
            t = time.perf_counter()
            first, n = None, 0
            stream = await client.completions.create(
                model="bench", prompt=p, max_tokens=new_tokens, temperature=0, stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    first = first or time.perf_counter() - t
                    n += chunk.choices[0].text.count(" t")
            ttfts.append(first)
            counts.append(n)

    t = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t
    await client.close()
    return sum(counts) / wall, np.array(ttfts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=128)
    args = p.parse_args()
    config = dataclasses.replace(MODELS[args.model], max_seq_len=max(args.max_seq_len, 128))
    platform = jax.devices()[0].platform
    print(
        f"model {args.model}: {config.param_count() / 1e6:.1f}M params, {config.dtype}; "
        f"jax {jax.__version__} on {platform}",
        flush=True,
    )
    params = random_params(config)
    model = Llama3(config=config, params=params, dtype=None, tokenizer=_IdTokenizer())
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, (args.requests, args.prompt_len)).tolist()

    engine = Engine(model.sampler(), max_batch=16, max_seq_len=args.max_seq_len)
    t = time.perf_counter()
    engine.warmup()
    print(f"warm-up (compiles every shape): {time.perf_counter() - t:.1f} s", flush=True)
    engine.start()
    rows = {}
    with ServerThread(ServeApp(engine, model.tokenizer, "bench")) as srv:
        asyncio.run(_clients(srv.url, prompts[:2], 4, 2))  # connections, first requests
        for c in (1, 4, 16):
            rows[c] = asyncio.run(_clients(srv.url, prompts, args.new_tokens, c))
    engine.close()

    hf = hf_model(config, params)
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        hf.generate(input_ids=ids[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        hf_rate = args.requests * args.new_tokens / (time.perf_counter() - t)

    seq_rate, seq_ttft = rows[1]
    seq_p99 = np.percentile(seq_ttft, 99)
    print(f"\n{args.requests} requests x {args.new_tokens} tokens, prompt {args.prompt_len}")
    print("clients  tok/s    x sequential  x transformers  ttft p50 ms  p99 ms  p99 x single")
    for c, (rate, ttft) in rows.items():
        p50, p99 = np.percentile(ttft, 50) * 1e3, np.percentile(ttft, 99) * 1e3
        print(
            f"{c:7d}  {rate:7.1f}  {rate / seq_rate:12.2f}  {rate / hf_rate:14.2f}  "
            f"{p50:11.1f}  {p99:6.1f}  {p99 / 1e3 / seq_p99:12.2f}"
        )
    print(f"transformers generate, one batch of {args.requests}: {hf_rate:.1f} tok/s")
    print("denominators: 'x sequential' = 1 client; 'x transformers' = the batch above; "
          "'p99 x single' = p99 TTFT with 1 client")  # fmt: skip


if __name__ == "__main__":
    main()
