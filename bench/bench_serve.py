"""`llama3 serve` under load: throughput and time to first token at 1, 4 and 16 concurrent
clients, against sequential requests to the same server and `transformers` `generate` batched
by hand, side by side in one run.

Method: a server (engine + HTTP app, uvicorn on 127.0.0.1, 16 slots) on a random model. One
list of `--requests` token-id prompts of realistic, varied lengths (log-normal, median
`--prompt_median` tokens, clipped to [8, max_seq_len - max_tokens]; the same list for every
row) and a fixed `--max_tokens` greedy tokens each (the random model's ids never hit a stop
id, so every request generates all of them). C clients (`openai.AsyncOpenAI`, streaming, in a
process of their own: serve_clients.py) pull requests from the list one after another, so C
are in flight at any time; they start spread over `--ramp` seconds (default: one
single-client request's latency, measured in the sequential row), the way independent users
arrive, not all in one millisecond. TTFT = until the first text chunk. Throughput =
generated tokens / wall time of all the requests. "sequential" = C = 1, the denominator of the
throughput ratios; its p99 TTFT is the denominator of the TTFT ratios. A "burst" row sends
C = 16 at the same instant (ramp 0) and shows what a synchronized wave costs: on CPU, prefill
is compute-bound, so the last of 16 simultaneous prompts waits for all 16 prefills whatever
the batching.
transformers: the same weights, `generate` on the same prompts in left-padded batches of 16,
the throughput an offline script batched by hand gets. Prints numbers and ratios; never
asserts on time.

  python bench/bench_serve.py --model tiny                # smoke test
  python bench/bench_serve.py --model 50M                 # ~50M float32 (PERF_NOTES, bench_train)
  python bench/bench_serve.py --model 1b --layers 4       # Llama-3.2-1B-shaped bf16, 4 of 16 layers
Goal (issue 12): at 16 clients >= 4x the sequential throughput, p99 TTFT < 2x the single one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sampling import SMALL, hf_model, random_params  # noqa: E402

from llama_jax import Llama3  # noqa: E402
from llama_jax.model.config import get_config  # noqa: E402
from llama_jax.serve.app import ServeApp  # noqa: E402
from llama_jax.serve.engine import Engine  # noqa: E402
from llama_jax.serve.server import ServerThread  # noqa: E402

MODELS = {
    "tiny": get_config("tiny", vocab_size=2048, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128),
    "50M": SMALL,
    "1b": dataclasses.replace(get_config("llama3.2-1b"), param_dtype="bfloat16", dtype="bfloat16"),
}
DEFAULTS = {  # (requests, max_tokens): a few minutes on 2 quiet cores
    "tiny": (32, 64),
    "50M": (32, 64),
    "1b": (16, 32),
}
SLOTS = 16


class _IdTokenizer:
    """Decodes ids as text for the server without a tokenizer file: each id is one word."""

    stop_ids: tuple[int, ...] = ()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode_bytes(self, ids):
        return "".join(f" t{int(i)}" for i in ids).encode()

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


def _clients(url, prompts, max_tokens, concurrency, ramp):
    """(tokens/s, TTFTs [R], latencies [R]), measured by serve_clients.py in its own process:
    the clients' own Python (SSE parsing) does not take the server's GIL, as remote clients'
    would not."""
    job = dict(url=url, prompts=prompts, max_tokens=max_tokens, concurrency=concurrency,
               ramp=ramp)  # fmt: skip
    script = os.path.join(os.path.dirname(__file__), "serve_clients.py")
    done = subprocess.run(
        [sys.executable, script], input=json.dumps(job), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"error: the clients failed:\n{done.stderr}")
    out = json.loads(done.stdout)
    return out["rate"], np.array(out["ttfts"]), np.array(out["latencies"])


def _hf_rate(config, params, prompts, max_tokens) -> float:
    hf = hf_model(config, params)
    with torch.inference_mode():
        hf.generate(input_ids=torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False,
                    pad_token_id=0)  # fmt: skip
        t = time.perf_counter()
        for i in range(0, len(prompts), SLOTS):
            batch = prompts[i : i + SLOTS]
            width = max(len(p) for p in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(batch):  # left-padded, as decoder-only generate needs
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return len(prompts) * max_tokens / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="cut the depth to N layers")
    p.add_argument("--requests", type=int, default=None, help="requests per row (default: "
                   "32; 16 for 1b)")  # fmt: skip
    p.add_argument("--max_tokens", type=int, default=None, help="new tokens per request "
                   "(default: 64; 32 for 1b)")  # fmt: skip
    p.add_argument("--prompt_median", type=int, default=96, help="median prompt tokens")
    p.add_argument("--max_seq_len", type=int, default=512, help="positions per slot")
    p.add_argument("--ramp", type=float, default=None, help="seconds over which the clients "
                   "start (default: one sequential request's latency)")  # fmt: skip
    p.add_argument("--skip_hf", action="store_true", help="no transformers row")
    args = p.parse_args()
    config = MODELS[args.model]
    if args.layers is not None:
        if not 1 <= args.layers <= config.n_layers:
            sys.exit(f"error: --layers={args.layers}; valid: 1 to {config.n_layers}")
        config = dataclasses.replace(config, n_layers=args.layers)
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, args.max_seq_len))
    requests, max_tokens = DEFAULTS[args.model]
    requests, max_tokens = args.requests or requests, args.max_tokens or max_tokens
    if not 1 <= max_tokens < args.max_seq_len - 8:
        sys.exit(f"error: --max_tokens={max_tokens}; valid: 1 to {args.max_seq_len - 9}")
    print(
        f"model {args.model}: {config.n_layers} layers, {config.param_count() / 1e6:.1f}M params, "
        f"{config.dtype}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    params = random_params(config)
    tokenizer = _IdTokenizer(config.vocab_size)
    model = Llama3(config=config, params=params, dtype=None, tokenizer=tokenizer)
    rng = np.random.default_rng(0)
    longest = args.max_seq_len - max_tokens
    lengths = np.clip(rng.lognormal(np.log(args.prompt_median), 0.7, requests), 8, longest)
    prompts = [rng.integers(3, config.vocab_size, int(n)).tolist() for n in lengths]
    print(
        f"{requests} requests x {max_tokens} new tokens; prompt tokens min/median/max "
        f"{int(lengths.min())}/{int(np.median(lengths))}/{int(lengths.max())}",
        flush=True,
    )

    engine = Engine(model.sampler(), max_batch=SLOTS, max_seq_len=args.max_seq_len)
    t = time.perf_counter()
    engine.warmup()
    print(f"warm-up (compiles every shape): {time.perf_counter() - t:.1f} s", flush=True)
    engine.start()
    rows = {}
    with ServerThread(ServeApp(engine, model.tokenizer, "bench")) as srv:
        _clients(srv.url, prompts[:2], 4, 2, 0)  # connections, first requests
        rows["1"] = _clients(srv.url, prompts, max_tokens, 1, 0)
        ramp = float(np.median(rows["1"][2])) if args.ramp is None else args.ramp
        for c in (4, 16):
            rows[str(c)] = _clients(srv.url, prompts, max_tokens, c, ramp)
            print(f"  {c} clients done", flush=True)
        rows["16 burst"] = _clients(srv.url, prompts, max_tokens, 16, 0)
    engine.close()
    hf_rate = None if args.skip_hf else _hf_rate(config, params, prompts, max_tokens)

    seq_rate, seq_ttft, _ = rows["1"]
    seq_p99 = np.percentile(seq_ttft, 99)
    print(f"\nclients start over {ramp:.2f} s (burst: at once); {SLOTS} slots")
    print("clients   tok/s    x sequential  x transformers  ttft p50 ms  p99 ms  p99 x single")
    for c, (rate, ttft, _) in rows.items():
        p50, p99 = np.percentile(ttft, 50) * 1e3, np.percentile(ttft, 99) * 1e3
        vs_hf = f"{rate / hf_rate:14.2f}" if hf_rate else f"{'-':>14}"
        print(
            f"{c:>8}  {rate:7.1f}  {rate / seq_rate:12.2f}  {vs_hf}  "
            f"{p50:11.1f}  {p99:6.1f}  {p99 / 1e3 / seq_p99:12.2f}"
        )
    if hf_rate:
        print(f"transformers generate, left-padded batches of {SLOTS}: {hf_rate:.1f} tok/s")
    print("denominators: 'x sequential' = 1 client; 'x transformers' = the batches above; "
          "'p99 x single' = p99 TTFT with 1 client")  # fmt: skip


if __name__ == "__main__":
    main()
