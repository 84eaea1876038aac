"""THE prepared accelerator check: correctness, peak rates, decode at the memory bound, MFU.

One run on one chip (GPU or TPU; `--tiny` on a CPU in seconds) prints one table:
  1. correctness (exit status 1 if one fails): cuDNN flash attention (the model's
     `attention_impl="cudnn"`) against the model's XLA attention, outputs and q/k/v gradients,
     bf16, causal, packed (on CPU: jax.nn's xla implementation instead); and decode chunking:
     `generate_ids` gives the same tokens for every `decode_chunk` (tiny model, on the chip).
  2. the chip's rates: a bf16 matmul (the measured peak) and a copy x + 1 over 2 GiB
     (read + write: the measured HBM bandwidth).
  3. decode through `Sampler.generate_ids` (the path users run: prefill, then the on-device
     while loop of `decode_chunk` steps per iteration) of the Llama 3.2 1B shape, random
     weights, bf16 and int8, batch 1 / 8 / 32: ms per step, tok/s and the fraction of the
     memory bound reached (weight bytes read per step / measured copy bandwidth); for int8
     also how many weight-sized float buffers the compiled step writes (dequantised copies:
     0 means the int8 weights are read in place). Then the tiny (2-layer) model's step at
     batch 1, decode_chunk 1 and the platform default: the fixed cost per step.
  4. peers: transformers `generate` (eager, bf16) on the same shape and batches; and with a
     static cache and `torch.compile` where it works.
  5. training: a sweep of (batch, seq, remat policy, loss chunk) for the 1B bf16 step (f32
     master weights, AdamW, cuDNN attention on a GPU), tokens/s and MFU, the best marked; and an
     8B-shaped row (same widths as Llama 3.1 8B, fewer layers) for the 8B per-layer cost.
     FLOPs/token = 6 x matmul params + 12 x L x T x N x H (ModelConfig.flops_per_token; causal
     attention not halved).
Sections run under a time budget (--minutes, compile included), most important first (batch-1
decode, the tiny floor, the first training point and the 8B row, then the larger batches, the
rest of the sweep, the peers): what does not fit is printed as skipped. Never asserts on time.
Each section is a function that adds rows (`Table.run`): a new check is one more function.

    python bench/accelerator_check.py            # full sizes on the default backend
    python bench/accelerator_check.py --tiny     # seconds on a CPU; what the test runs
    python bench/accelerator_check.py --train_sweep 8x2048:dots_with_no_batch_dims:1024
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import numpy as np
from accelerator_checks import attention_check, splash_tpu_compile

NOMINAL = {  # dense bf16 FLOP/s, HBM bytes/s (vendor sheets), by device_kind substring
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}
# Training points: batch x seq : remat policy : loss chunk tokens (0 = full logits).
TRAIN_SWEEP = (
    "8x2048:dots_with_no_batch_dims:1024",
    "16x2048:dots_with_no_batch_dims:1024",
    "8x4096:dots_with_no_batch_dims:2048",
    "16x2048:save_qkv_proj:1024",
    "32x2048:full:2048",
)
TINY_SWEEP = ("2x64:dots_with_no_batch_dims:64",)
REPEATS = [3]  # timed calls per measurement (1 at --tiny: a smoke run)
EIGHT_B_LAYERS = 4  # the 8B-shaped row: Llama 3.1 8B widths with this many layers


Row = tuple[str, str, str, str]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _timed(f, n: int) -> float:
    """Median seconds of n calls of f (which blocks), n capped by REPEATS."""
    n = min(n, REPEATS[0])
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _mesh():
    import jax

    from llama_jax.model import sharding

    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def matmul_rate(tiny: bool) -> float:
    import jax
    import jax.numpy as jnp

    n = 1024 if tiny else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / _timed(lambda: f(a).block_until_ready(), 5)


def copy_bandwidth(tiny: bool) -> float:
    """Bytes moved per second (read + write) by an elementwise op over 2 GiB (32 MiB tiny)."""
    import jax
    import jax.numpy as jnp

    n = (32 if tiny else 2048) * 2**20 // 4
    a = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    return 2 * 4 * n / _timed(lambda: f(a).block_until_ready(), 5)


# ----------------------------------------------------------------------------- training
def parse_point(spec: str) -> tuple[int, int, str, int]:
    """ "BxT:remat:loss_chunk" -> (batch, seq, remat, loss chunk tokens)."""
    from llama_jax.model.config import REMAT_POLICIES

    try:
        shape, remat, chunk = spec.split(":")
        batch, seq = (int(x) for x in shape.split("x"))
        chunk_tokens = int(chunk)
    except ValueError:
        raise ValueError(
            f"training point {spec!r}; valid: BATCHxSEQ:REMAT:LOSS_CHUNK, e.g. "
            "8x2048:dots_with_no_batch_dims:1024"
        ) from None
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} in {spec!r}; valid: {', '.join(REMAT_POLICIES)}")
    if batch < 1 or seq < 1 or chunk_tokens < 0:
        raise ValueError(f"training point {spec!r}: batch, seq >= 1 and loss chunk >= 0")
    return batch, seq, remat, chunk_tokens


def train_rate(mc, batch: int, seq: int, loss_chunk: int, steps: int) -> tuple[float, float]:
    """(tokens/s, FLOP/s) of the trainer's own step for config mc."""
    import flax.linen as nn
    import jax

    from llama_jax.model import sharding
    from llama_jax.training import experiment
    from llama_jax.training import step as training_step
    from llama_jax.training import trainer as T

    mc = dataclasses.replace(mc, max_seq_len=max(mc.max_seq_len, seq))
    c = experiment.base_config()
    c.batch_size, c.seq_len, c.loss_chunk_tokens = batch, seq, loss_chunk
    mesh = _mesh()
    tx, sched = T.make_tx(c, 1000)
    boxed = jax.eval_shape(functools.partial(T.init_state, mc, tx, 0))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    bsh = sharding.batch_sharding(mesh)
    step = jax.jit(
        training_step.make_train_step(mc, tx, sched, c),
        in_shardings=(shardings, bsh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    rng = np.random.RandomState(0)
    toks = rng.randint(0, mc.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = jax.device_put(
        {
            "inputs": toks[:, :-1],
            "targets": toks[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "loss_mask": np.ones((batch, seq), np.float32),
        },
        bsh,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state = jax.jit(lambda: nn.unbox(T.init_state(mc, tx, 0)), out_shardings=shardings)()
        state, m = step(state, b)  # compile
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, b)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
    del state
    tps = batch * seq / dt
    return tps, tps * mc.flops_per_token(seq)


def train_config(tiny: bool, gpu: bool, remat: str, eight_b: bool = False):
    from llama_jax.model.config import get_config

    if tiny:
        n = dict(n_layers=1) if eight_b else {}
        return get_config("tiny", dtype="bfloat16", remat_policy=remat, **n)
    impl = "cudnn" if gpu else "xla"
    if eight_b:
        return get_config(
            "llama3.1-8b", dtype="bfloat16", attention_impl=impl, remat_policy=remat,
            n_layers=EIGHT_B_LAYERS,
        )  # fmt: skip
    return get_config("llama3.2-1b", dtype="bfloat16", attention_impl=impl, remat_policy=remat)


# ----------------------------------------------------------------------------- decode
def make_sampler(tiny: bool, quantize: str | None, layout: str = "auto", chunk: int | None = None):
    import flax.linen as nn
    import jax

    from llama_jax.inference.sampler import Sampler
    from llama_jax.model.config import get_config
    from llama_jax.model.transformer import init_params

    mc = get_config("tiny" if tiny else "llama3.2-1b", dtype="bfloat16")
    params = jax.jit(lambda k: nn.unbox(init_params(mc, k)))(jax.random.key(0))
    return Sampler(mc, params, _mesh(), quantize=quantize, layout=layout, decode_chunk=chunk)


def decode_rate(sampler, batch: int, tokens: int, prompt_len: int) -> tuple[float, float]:
    """(ms per decode step, time to first token s) of greedy `generate_ids` at this batch:
    step = (time(tokens) - time(1 token)) / (tokens - 1), medians of 3 after a warm-up."""
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(batch)]

    def gen(n):
        return lambda: sampler.generate_ids(prompts, n)

    ttft = _timed(gen(1), 3)
    total = _timed(gen(tokens), 3)
    return 1e3 * max(total - ttft, 1e-9) / (tokens - 1), ttft


def weight_bytes(sampler) -> int:
    """Bytes a decode step reads from the weights: all of them but the embedding lookup table
    (one row per token) unless the head reads it too (tied)."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(sampler.params)
    total = 0
    for path, a in leaves:
        name = jax.tree_util.keystr(path)
        if "embedding" in name and not sampler.config.tie_embeddings:
            continue
        total += a.nbytes
    return total


def dequantised_copies(sampler) -> int:
    """Weight-sized float buffers the compiled decode step writes (0: int8 read in place)."""
    import jax
    import jax.numpy as jnp

    from llama_jax.inference.decode_layout import float_buffers

    # 40 cache slots: the cache's buffers stay smaller than a weight even in the tiny model.
    _, cache = sampler.prefill(np.ones((1, 8), np.int32), np.array([8]), 40)
    with sampler.context():
        hlo = (
            sampler._decode_jit.lower(
                sampler.params,
                cache,
                sampler.put(np.ones(1, np.int32)),
                sampler.put(np.array([8], np.int32)),
            )  # fmt: skip
            .compile()
            .as_text()
        )
    smallest = min(a.size for a in jax.tree.leaves(sampler.params) if a.dtype == jnp.int8)
    return len(float_buffers(hlo, smallest))


def chunking_check(chunks: tuple[int, ...]) -> tuple[bool, str]:
    """generate_ids on the tiny model: the same tokens for every decode_chunk (greedy and
    sampled, a stop id met mid-chunk, a budget no chunk divides)."""
    from llama_jax.inference.sampling_params import SamplingParams

    s = make_sampler(True, None, chunk=1)
    prompts = [[1, 5, 9], [2, 4, 6, 8, 10, 12], [3]]
    sp = SamplingParams(temperature=1.0)
    outs = {}
    for k in chunks:
        s.decode_chunk = k
        full = s.generate_ids(prompts, 13)
        stops = {full[0][4], full[1][2]}
        outs[k] = (
            full,
            s.generate_ids(prompts, 13, stop_ids=stops),
            s.generate_ids(prompts, 13, sp, 3),
        )
    same = all(outs[k] == outs[1] for k in outs)
    ks = ", ".join(map(str, chunks))
    return same, f"same tokens for decode_chunk {ks}" if same else f"differ: {outs}"


# ----------------------------------------------------------------------------- peers
def hf_decode(tiny: bool, batches: list[int], tokens: int, prompt_len: int, compiled: bool):
    """{batch: ms per step} of transformers `generate` (greedy, bf16) on the same shape, random
    weights; `compiled`: static cache + torch.compile of the forward."""
    import torch
    import transformers

    from llama_jax.model.config import get_config

    mc = get_config("tiny" if tiny else "llama3.2-1b", dtype="bfloat16")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = transformers.LlamaConfig(**{**mc.to_hf(), "bos_token_id": 1, "eos_token_id": 2})
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if compiled:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    out = {}
    for b in batches:
        ids = torch.randint(3, min(1000, mc.vocab_size), (b, prompt_len), device=dev)

        def gen(n, ids=ids):
            def run():
                with torch.inference_mode():
                    model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0,
                    )  # fmt: skip
                if dev == "cuda":
                    torch.cuda.synchronize()

            return run

        ttft = _timed(gen(1), 2)
        total = _timed(gen(tokens), 2)
        out[b] = 1e3 * max(total - ttft, 1e-9) / (tokens - 1)
    return out


# ----------------------------------------------------------------------------- the run
class Table:
    """The rows printed at the end, and the time budget the sections run under."""

    def __init__(self, minutes: float):
        self.rows: list[Row] = []
        self.ok = True
        self.start = time.perf_counter()
        self.budget = 60 * minutes

    def add(self, *row: str) -> None:
        self.rows.append(tuple(row))  # type: ignore[arg-type]
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:4.0f} s] " + "  |  ".join(row), flush=True)  # progress, if cut short

    def time_left(self, what: str) -> bool:
        if time.perf_counter() - self.start < self.budget:
            return True
        self.add(what, "skipped", "out of time", f"--minutes {self.budget / 60:g}")
        return False

    def run(self, what: str, f, *args) -> None:
        """Runs a section that adds its own rows; an error becomes a row (not a failure)."""
        if not self.time_left(what):
            return
        try:
            f(*args)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at one sweep point
            self.add(what, "error", f"{type(e).__name__}: {str(e)[:120]}", "-")

    def print(self) -> None:
        widths = [max(len(r[i]) for r in self.rows) for i in range(4)]
        print()
        for r in self.rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the default off a GPU/TPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps timed (10; tiny 2)")
    p.add_argument("--decode_tokens", type=int, default=None, help="new tokens (64; tiny 8)")
    p.add_argument("--decode_batches", default=None, help="comma list (1,8,32; tiny 1)")
    p.add_argument("--train_sweep", default=None, help="comma list of BxT:remat:loss_chunk")
    p.add_argument("--minutes", type=float, default=4.5, help="time budget, compile included")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers rows")
    p.add_argument(
        "--tpu_topology",
        default="v5e:2x2",
        help="compile splash attention for this TPU topology when libtpu is installed ('' skips)",
    )
    args = p.parse_args()
    import jax

    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    tiny = args.tiny or dev.platform == "cpu"
    try:
        sweep = [parse_point(x) for x in (args.train_sweep or ",".join(
            TINY_SWEEP if tiny else TRAIN_SWEEP)).split(",")]  # fmt: skip
        batches = [int(b) for b in (args.decode_batches or ("1" if tiny else "1,8,32")).split(",")]
    except ValueError as e:
        print(f"error: {e}")
        return 2
    steps = args.steps or (2 if tiny else 10)
    tokens = args.decode_tokens or (8 if tiny else 64)
    prompt_len = 8 if tiny else 128
    kind = getattr(dev, "device_kind", dev.platform)
    flops_nom, bw_nom = next((v for k, v in NOMINAL.items() if k in kind), (None, None))
    size = "tiny" if tiny else "full"
    print(f"device: {kind} ({dev.platform}), jax {jax.__version__}, sizes: {size}")
    t = Table(args.minutes)
    rates = {}

    # 1. correctness
    what, d_out, d_grad, passed = attention_check(tiny, gpu)
    t.ok &= passed
    t.add(
        what,
        f"max|dout| {d_out:.2e}",
        f"max|dgrad|/max|grad| {d_grad:.2e}",
        "PASS" if passed else "FAIL",
    )
    if tiny:
        REPEATS[0] = 1
    same, msg = chunking_check((1, 3) if tiny else (1, 3, 8))
    t.ok &= same
    t.add(
        "decode_chunk: generate_ids tokens",
        msg,
        "tiny model, greedy/stop/sampled",
        "PASS" if same else "FAIL",
    )

    if args.tpu_topology:
        t.run("splash TPU compile", lambda: t.add(*splash_tpu_compile(tiny, args.tpu_topology)))

    # 2. rates
    def chip_rates():
        rates["peak"] = peak = matmul_rate(tiny)
        nom = f"nominal {flops_nom / 1e12:.0f}" if flops_nom else "nominal -"
        t.add("bf16 matmul (measured peak)", f"{peak / 1e12:.3f} TFLOP/s", nom,
              f"{peak / flops_nom:.0%}" if flops_nom else "-")  # fmt: skip
        rates["bw"] = bw = copy_bandwidth(tiny)
        nom = f"nominal {bw_nom / 1e9:.0f}" if bw_nom else "nominal -"
        t.add("copy bandwidth (read+write)", f"{bw / 1e9:.1f} GB/s", nom,
              f"{bw / bw_nom:.0%}" if bw_nom else "-")  # fmt: skip

    t.run("chip rates", chip_rates)

    # 3-4. decode and training, in the order that matters most if time runs out: batch-1
    # decode and the tiny floor, the first training point and the 8B-shaped row, then the
    # larger decode batches and the rest of the sweep.
    base, samplers = {}, {}

    def decode(quantize, layout, bs):
        if (quantize, layout) not in samplers:
            samplers[quantize, layout] = make_sampler(tiny, quantize, layout)
        s = samplers[quantize, layout]
        wb = weight_bytes(s)
        name = f"{quantize or 'bf16'} {s.layout} k={s.decode_chunk}"
        if quantize and bs == batches[:1]:
            copies = dequantised_copies(s)
            t.add(f"decode {name}: dequantised weight copies", str(copies),
                  "weight-sized float buffers per step", "0 = int8 read in place")  # fmt: skip
        for b in bs:
            if not t.time_left(f"decode {name} batch {b}"):
                return
            ms, ttft = decode_rate(s, b, tokens, prompt_len)
            bound = 1e3 * wb / rates["bw"] if "bw" in rates else float("nan")
            base.setdefault(b, ms)
            t.add(f"decode {_size(s.config.param_count())} {name} batch {b}",
                  f"{ms:.3f} ms/step, {1e3 * b / ms:,.0f} tok/s",
                  f"bound {bound:.3f} ms ({wb / 1e9:.2f} GB weights)",
                  f"{bound / ms:.0%} of HBM bound; {base[b] / ms:.2f}x bf16")  # fmt: skip

    variants = [(None, "auto"), ("int8", "auto")] + ([] if tiny else [("int8", "matvec")])
    for q, layout in variants:
        t.run(f"decode {q or 'bf16'} {layout}", decode, q, layout, batches[:1])

    def floor():
        s = make_sampler(True, None, chunk=1)
        default = make_sampler(True, None).decode_chunk
        for k in sorted({1, default, 8}):
            s.decode_chunk = k
            ms, _ = decode_rate(s, 1, max(tokens, 32), 8)
            t.add(f"decode tiny 2-layer batch 1 k={k}", f"{ms:.3f} ms/step", "fixed cost per step",
                  "default" if k == default else "-")  # fmt: skip

    t.run("decode tiny floor", floor)

    train_rows = []

    def train(mc, b, seq, chunk, label):
        tps, fl = train_rate(mc, b, seq, chunk, steps)
        peak = rates.get("peak", float("nan"))
        nom = f", {fl / flops_nom:.1%} of nominal" if flops_nom else ""
        what = f"{_size(mc.param_count())} {b}x{seq} remat={mc.remat_policy} loss_chunk={chunk}"
        row = (
            f"train {label} {what}",
            f"{tps:,.0f} tok/s",
            f"{fl / 1e12:.3f} TFLOP/s",
            f"MFU {fl / peak:.1%} of measured{nom}",
        )
        t.add(*row)
        if label == "1B-shape":
            train_rows.append((fl, row))

    def train_point(point):
        b, seq, remat, chunk = point
        mc = train_config(tiny, gpu, remat)
        t.run(f"train 1B {b}x{seq} {remat}", train, mc, b, seq, chunk, "1B-shape")

    train_point(sweep[0])
    b, seq, remat, chunk = sweep[0]
    label = f"8B-shape {1 if tiny else EIGHT_B_LAYERS} layers"
    mc8 = train_config(tiny, gpu, remat, eight_b=True)
    t.run("train 8B-shaped", train, mc8, max(1, b // 2), seq, chunk, label)
    for q, layout in variants:
        if batches[1:]:
            t.run(f"decode {q or 'bf16'} {layout}", decode, q, layout, batches[1:])
    samplers.clear()  # the decode weights leave the device before the larger training points
    for point in sweep[1:]:
        train_point(point)
    if train_rows:
        best = max(train_rows)[1]
        t.add("train best: " + best[0].removeprefix("train "), *best[1:])

    # 5. peers
    def hf(compiled):
        ms = hf_decode(tiny, batches, tokens, prompt_len, compiled)
        for b, v in ms.items():
            ratio = f"llama_jax bf16 {v / base[b]:.1f}x faster" if b in base else "-"
            t.add(f"transformers {'static+compile' if compiled else 'eager'} batch {b}",
                  f"{v:.3f} ms/step, {1e3 * b / v:,.0f} tok/s", "bf16 generate", ratio)  # fmt: skip

    if not args.no_hf:
        t.run("transformers eager", hf, False)
        if gpu:  # torch.compile on CPU needs a C++ toolchain and minutes
            t.run("transformers static+compile", hf, True)

    t.print()
    print(f"wall: {time.perf_counter() - t.start:.0f} s")
    print("correctness:", "PASS" if t.ok else "FAIL")
    return 0 if t.ok else 1


if __name__ == "__main__":
    sys.exit(main())
