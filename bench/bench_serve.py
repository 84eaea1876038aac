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

`--vs_generate` (issue 23, item 12): for each of `--models` (default: the README demo's shape
and 50M), one client's tok/s through the live server (streaming, one request after another)
next to `Llama3.generate` on the same prompts, one at a time (greedy, same max_tokens), and 16
concurrent clients' total tok/s (all 16 start at once, then closed-loop); each served row for
the engine as it is (the step on the smallest slot bucket that holds the choices in use) and
with `slot_buckets=(16,)` (every step on all 16 slots: the engine before buckets), the two
engines side by side in one run, rounds interleaved, medians printed. The one-client rows
are timed with the official `openai` client and, for the engine as it is, with the lightest
client (plain httpx, SSE lines parsed by hand): the difference is the client's own Python,
which here shares the server's two cores. `--client_cpus` puts the clients on CPUs of their
own; each run prints the clients' share of a CPU.

  python bench/bench_serve.py --vs_generate                       # demo and 50M
Goal: one client >= 0.9x generate; 16 clients (buckets) >= 1.0x 16 clients (all slots).
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
from llama_jax.model.config import ModelConfig, get_config  # noqa: E402
from llama_jax.serve.app import ServeApp  # noqa: E402
from llama_jax.serve.engine import Engine  # noqa: E402
from llama_jax.serve.server import ServerThread  # noqa: E402
from llama_jax.training.experiment import demo_model_config  # noqa: E402

MODELS = {
    "tiny": get_config("tiny", vocab_size=2048, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128),
    "demo": ModelConfig(**demo_model_config().to_dict()),  # the README's Shakespeare model
    "50M": SMALL,
    "1b": dataclasses.replace(get_config("llama3.2-1b"), param_dtype="bfloat16", dtype="bfloat16"),
}
DEFAULTS = {  # (requests, max_tokens): a few minutes on 2 quiet cores
    "tiny": (32, 64),
    "demo": (32, 64),
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


CLIENT_CPUS: list[int] = []  # --client_cpus: the clients' CPUs (this process keeps the others)
CLIENT_SHARE: list[float] = []  # the clients' CPU seconds / wall seconds, one per call


def _clients(url, prompts, max_tokens, concurrency, ramp, stream=True, client="openai"):
    """(tokens/s, TTFTs [R], latencies [R]), measured by serve_clients.py in its own process:
    the clients' own Python (SSE parsing) does not take the server's GIL, as remote clients'
    would not. The share of a CPU the clients used is appended to CLIENT_SHARE."""
    job = dict(url=url, prompts=prompts, max_tokens=max_tokens, concurrency=concurrency,
               ramp=ramp, stream=stream, cpus=CLIENT_CPUS, client=client)  # fmt: skip
    script = os.path.join(os.path.dirname(__file__), "serve_clients.py")
    done = subprocess.run(
        [sys.executable, script], input=json.dumps(job), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"error: the clients failed:\n{done.stderr}")
    out = json.loads(done.stdout)
    CLIENT_SHARE.append(out["cpu_s"] / out["wall_s"])
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


def _prompts(config, requests, max_tokens, median, max_seq_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.7, requests), 8, max_seq_len - max_tokens)
    return [rng.integers(3, config.vocab_size, int(n)).tolist() for n in lengths]


def _generate_rate(model, prompts, max_tokens) -> float:
    """`Llama3.generate_ids`, one prompt after another: new tokens / wall time."""
    t, n = time.perf_counter(), 0
    for p in prompts:
        n += len(model.generate_ids([p], max_new_tokens=max_tokens, temperature=0)[0])
    return n / (time.perf_counter() - t)


def vs_generate(args) -> None:
    """One client through the server next to `Llama3.generate`, 16 clients, with and without
    slot buckets (see the module docstring)."""
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}{_placement()}", flush=True)  # fmt: skip
    table, shares = [], collections.defaultdict(list)
    for name in args.models.split(","):
        config = dataclasses.replace(MODELS[name], max_seq_len=args.max_seq_len)
        max_tokens = args.max_tokens or 64
        print(f"\nmodel {name}: {config.n_layers} layers, d {config.dim}, vocab "
              f"{config.vocab_size}, {config.param_count() / 1e6:.1f}M params, {config.dtype}; "
              f"{SLOTS} slots of {args.max_seq_len}; {max_tokens} new tokens a request, greedy",
              flush=True)  # fmt: skip
        model = Llama3(config=config, params=random_params(config), dtype=None,
                       tokenizer=_IdTokenizer(config.vocab_size))  # fmt: skip
        one = _prompts(config, args.single, max_tokens, args.prompt_median, args.max_seq_len)
        many = _prompts(config, 3 * SLOTS, max_tokens, args.prompt_median, args.max_seq_len, 1)
        _generate_rate(model, one, max_tokens)  # compiles each prompt and cache bucket
        engines = {}
        for label, buckets in (("buckets", None), ("all slots", (SLOTS,))):
            engine = Engine(model.sampler(), SLOTS, args.max_seq_len, slot_buckets=buckets)
            t = time.perf_counter()
            engine.warmup()
            print(f"  warm-up, {label} {engine.slots.sizes}: {time.perf_counter() - t:.1f} s; "
                  f"steps a call by size {engine.slots.chunks}", flush=True)  # fmt: skip
            engine.start()
            engines[label] = engine
        rates = collections.defaultdict(list)
        with contextlib.ExitStack() as stack:
            urls = {}
            for label, engine in engines.items():
                srv = stack.enter_context(ServerThread(ServeApp(engine, model.tokenizer, "bench")))
                urls[label] = srv.url
                _clients(srv.url, one[:2], 4, 2, 0)  # connections, first requests
            for r in range(args.rounds):
                rates["generate"].append(_generate_rate(model, one, max_tokens))
                for label, url in urls.items():
                    steps = collections.Counter(engines[label].steps_by_size)
                    rates[f"1 client, {label}"].append(_clients(url, one, max_tokens, 1, 0)[0])
                    ran = engines[label].steps_by_size - steps
                    if label == "buckets":
                        shares[name, "streamed"].append(CLIENT_SHARE[-1])
                        rates["1 client, buckets, no stream"].append(
                            _clients(url, one, max_tokens, 1, 0, stream=False)[0]
                        )
                        shares[name, "not streamed"].append(CLIENT_SHARE[-1])
                        for stream in (True, False):  # the lightest client: plain httpx
                            rate = _clients(url, one, max_tokens, 1, 0, stream, "httpx")[0]
                            rates[f"1 client, buckets, httpx{'' if stream else ', no stream'}"
                                  ].append(rate)  # fmt: skip
                    rates[f"16 clients, {label}"].append(
                        _clients(url, many, max_tokens, SLOTS, 0)[0]
                    )
                    if r == 0:
                        print(f"  1 client, {label}: steps by slot count {dict(ran)}", flush=True)
                print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in
                      rates.items()), flush=True)  # fmt: skip
        for engine in engines.values():
            engine.close()
        med = {k: float(np.median(v)) for k, v in rates.items()}
        table.append((name, med))

    print(f"\nmedians of {args.rounds} interleaved rounds, tok/s (1 client: {args.single} "
          f"requests one after another, streaming; 16 clients: {3 * SLOTS} requests; the "
          "openai client)")  # fmt: skip
    print("model  generate  1 client  x generate  (not streamed)  x generate  "
          "1 client (all slots)  x generate  16 clients  16 (all slots)  x all slots")  # fmt: skip
    for name, m in table:
        g, one_b, one_a = m["generate"], m["1 client, buckets"], m["1 client, all slots"]
        one_n = m["1 client, buckets, no stream"]
        many_b, many_a = m["16 clients, buckets"], m["16 clients, all slots"]
        print(
            f"{name:>5}  {g:8.1f}  {one_b:8.1f}  {one_b / g:10.2f}  {one_n:14.1f}  "
            f"{one_n / g:10.2f}  {one_a:20.1f}  {one_a / g:10.2f}  {many_b:10.1f}  "
            f"{many_a:14.1f}  {many_b / many_a:11.2f}"
        )
    for name, m in table:
        g, a, b = (
            m["generate"],
            m["1 client, buckets, httpx"],
            m["1 client, buckets, httpx, no stream"],
        )
        print(f"{name:>5}  one light client (plain httpx): streamed {a:.1f} ({a / g:.2f}x "
              f"generate), not streamed {b:.1f} ({b / g:.2f}x)")  # fmt: skip
    print("the one client's share of a CPU (its CPU seconds / wall seconds, medians): " + ", ".join(
        f"{m} {kind} {np.median(v):.2f}" for (m, kind), v in shares.items()
    ))  # fmt: skip
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def _placement() -> str:
    if not CLIENT_CPUS:
        return "; clients and server share every CPU"
    mine = sorted(os.sched_getaffinity(0))
    return f"; server and generate on CPUs {mine}, clients on {CLIENT_CPUS}"


def _pin_clients(spec: str) -> None:
    """--client_cpus: the clients run on these CPUs and this process (server, engine and
    `generate`) on the rest, as a client on another machine would leave the server's CPUs alone.
    Before jax starts its backend, so XLA sizes its thread pool to the CPUs it keeps."""
    have = sorted(os.sched_getaffinity(0))
    try:
        cpus = sorted({int(c) for c in spec.split(",")})
    except ValueError:
        sys.exit(f"error: --client_cpus {spec!r}; valid: a comma list of CPU ids from {have}")
    if not set(cpus) < set(have):
        sys.exit(f"error: --client_cpus {spec!r}; valid: some, not all, of the CPU ids {have}")
    CLIENT_CPUS[:] = cpus
    os.sched_setaffinity(0, set(have) - set(cpus))


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
    p.add_argument("--vs_generate", action="store_true", help="one client vs Llama3.generate "
                   "and 16 clients, with and without slot buckets (see above)")  # fmt: skip
    p.add_argument("--models", default="demo,50M", help="--vs_generate's models")
    p.add_argument("--single", type=int, default=12, help="--vs_generate: one client's requests")
    p.add_argument("--rounds", type=int, default=2, help="--vs_generate: interleaved rounds")
    p.add_argument("--client_cpus", default=None, help="comma list of CPU ids for the clients; "
                   "the server and generate keep the others (a remote client)")  # fmt: skip
    args = p.parse_args()
    if args.client_cpus is not None:
        _pin_clients(args.client_cpus)
    if args.vs_generate:
        bad = [m for m in args.models.split(",") if m not in MODELS]
        if bad:
            sys.exit(f"error: --models {bad[0]!r}; valid: {', '.join(sorted(MODELS))}")
        vs_generate(args)
        return
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
