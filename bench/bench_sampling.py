"""Greedy generation speed, llama_jax against Hugging Face transformers, side by side.

Same weights, same machine, one run: decode tokens/s at batch 1 and 8 and time to first token,
for a ~50M float32 model and a Llama-3.2-1B-shaped random bfloat16 model (built directly from
random numpy params; the HF model gets the same weights). For the 1B model the decode rate is
also given as a fraction of its memory-bandwidth bound (parameter bytes read per token /
read bandwidth measured here with a 1 GiB reduction), and the decode layouts are compared:
"matvec" (the CPU default for 16-bit weights), "standard" (the model's own layout), a float32
decode copy and int8 weights (quantize="int8"). For the 50M model, scanned vs unrolled layers.
Every row times the same number of new tokens; a row whose dtype differs from transformers'
is compared with llama_jax's default row of the same model instead (each ratio names its
denominator).

Method: ttft = time of a 1-token generation (prefill + first token); decode ms/token =
(time(N tokens) - ttft) / (N - 1); medians of `--repeats` runs after a warm-up (which also
compiles). Prints numbers and ratios; never asserts on time. These machines are noisy (other
jobs share the CPUs): compare within one run.

  python bench/bench_sampling.py              # both models (~10 minutes on 2 CPUs)
  python bench/bench_sampling.py --only small --batches 1
  python bench/bench_sampling.py --tiny        # a smoke run at toy sizes
  python bench/bench_sampling.py --only chunks --chunks 1,4,8   # decode_chunk, tiny + 50M
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import dataclasses
import gc
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
import transformers
from shapes import SMALL_50M  # noqa: E402  (bench/)

from llama_jax import formats
from llama_jax.inference.sampler import Sampler
from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig, get_config
from llama_jax.model.transformer import init_params

SMALL = ModelConfig(**SMALL_50M, max_seq_len=2048)


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random numpy params (std 0.02, norms ~1) in config.param_dtype, one leaf at a time."""
    import flax.linen as nn

    abstract = jax.eval_shape(lambda k: nn.unbox(init_params(config, k)), jax.random.key(0))
    rng = np.random.default_rng(seed)
    dt = ml_dtypes.bfloat16 if config.param_dtype == "bfloat16" else np.dtype(config.param_dtype)

    def make(path, a):
        out = np.empty(a.shape, dt)
        flat = out.reshape(-1)
        norm = "scale" in jax.tree_util.keystr(path)
        for i in range(0, flat.size, 1 << 24):  # 64 MiB of float32 at a time
            n = min(1 << 24, flat.size - i)
            x = rng.standard_normal(n, dtype=np.float32) * 0.02
            flat[i : i + n] = (x + 1.0 if norm else x).astype(dt)
        return out

    return jax.tree_util.tree_map_with_path(make, abstract)


def hf_model(config: ModelConfig, params: dict) -> transformers.LlamaForCausalLM:
    """The transformers model with the same weights (its own copy, in the same dtype)."""
    hf_cfg = transformers.LlamaConfig(**{**config.to_hf(), "bos_token_id": 1, "eos_token_id": 2})
    dtype = torch.bfloat16 if config.param_dtype == "bfloat16" else torch.float32
    with torch.device("meta"):  # no random init: the weights come from `params`
        model = transformers.LlamaForCausalLM(hf_cfg)
    state = {}
    for name, a in formats.params_to_tensors(params, config):
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.itemsize == 2 \
            else torch.from_numpy(a)  # fmt: skip
        state[name] = t.to(dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    # Buffers are not in the state dict: rebuild the rotary table on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg)
    return model.eval()


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(generate, n_new: int, repeats: int) -> tuple[float, float]:
    """(ttft s, decode s per step) of generate(n) -> tokens."""
    ttft = time_it(lambda: generate(1), repeats)
    total = time_it(lambda: generate(n_new), repeats)
    return ttft, max(total - ttft, 1e-9) / (n_new - 1)


def ours_fn(sampler: Sampler, prompts: list[list[int]]):
    return lambda n: sampler.generate_ids(prompts, n)


def hf_fn(model, prompts: list[list[int]]):
    ids = torch.tensor(prompts)

    def run(n):
        with torch.inference_mode():
            return model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=0,
            )  # fmt: skip

    return run


def check_same_tokens(sampler, hf, prompts, n=8) -> str:
    ours = sampler.generate_ids(prompts, n)
    theirs = hf_fn(hf, prompts)(n)[:, len(prompts[0]) :].tolist()
    same = sum(a == b for a, b in zip(ours, theirs))
    return f"{same}/{len(prompts)} rows identical over {n} greedy tokens"


def read_bandwidth(repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the faster of two 1 GiB float32 reductions (whole-array and
    row sums; they differ in how XLA splits them over threads)."""
    arrays = [jnp.ones((1 << 28,), jnp.float32)]  # 1 GiB, read once per reduction
    rates = []
    for f in (jax.jit(jnp.sum), jax.jit(lambda a: a.reshape(-1, 4096).sum(axis=1))):
        rates.append((1 << 30) / time_it(lambda f=f: f(arrays[0]).block_until_ready(), repeats))
    arrays.clear()
    print(
        f"read bandwidth (1 GiB sum / row sums): {rates[0] / 1e9:.1f} / {rates[1] / 1e9:.1f} GB/s"
    )
    return max(rates)


ROWS: list[dict] = []


def report(
    model: str, path: str, batch: int, ttft: float, step: float, ref: dict | None = None
) -> None:
    row = dict(model=model, path=path, batch=batch, ttft=ttft, step=step)
    ROWS.append(row)
    extra = ""
    if ref is not None:
        extra = (
            f"  decode x{ref['step'] / step:.2f} vs {ref['path']}, ttft x{ref['ttft'] / ttft:.2f}"
        )
    print(
        f"{model:6s} {path:34s} B={batch}: ttft {ttft * 1e3:8.1f} ms, {step * 1e3:7.1f} ms/step, "
        f"{batch / step:8.1f} tok/s{extra}",
        flush=True,
    )


def bench_model(name, config, prompt_len, n_new, repeats, variants, batches, bw_bytes=None):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = random_params(config)
    hf = hf_model(config, params)
    torch.set_num_threads(torch.get_num_threads())
    rng = np.random.default_rng(1)
    prompts = {
        b: rng.integers(3, config.vocab_size, (b, prompt_len)).tolist() for b in (*batches, 4)
    }
    hf_res, ours_default = {}, {}
    for b in batches:
        ttft, step = measure(hf_fn(hf, prompts[b]), n_new, repeats)
        report(name, f"transformers generate ({config.dtype})", b, ttft, step)
        hf_res[b] = ROWS[-1]
    for label, kwargs in variants:
        kwargs = dict(kwargs)
        check = kwargs.pop("check", True)
        sampler = Sampler(config, params, mesh, **kwargs)
        decode_dtype = kwargs.get("dtype") or config.dtype
        label = f"llama_jax {label} [{sampler.layout}]"
        if check:
            print(f"  tokens: {check_same_tokens(sampler, hf, prompts[4])}", flush=True)
        for b in batches:
            ttft, step = measure(ours_fn(sampler, prompts[b]), n_new, repeats)
            like_for_like = decode_dtype == config.dtype and not kwargs.get("quantize")
            ref = hf_res[b] if like_for_like else ours_default.get(b)
            report(name, label, b, ttft, step, ref)
            if like_for_like:
                ours_default.setdefault(b, ROWS[-1])
            if bw_bytes is not None and b == 1:
                per_token = sum(x.nbytes for x in jax.tree.leaves(sampler.params))
                bound = per_token / bw_bytes
                print(
                    f"         bandwidth bound: {per_token / 1e9:.2f} GB/token / "
                    f"{bw_bytes / 1e9:.1f} GB/s = {bound * 1e3:.1f} ms -> "
                    f"{bound / step * 100:.0f}% of bound",
                    flush=True,
                )
        del sampler
        gc.collect()
    del hf, params
    gc.collect()


def bench_chunks(chunks, n_new, repeats, batches):
    """Decode ms/step by decode_chunk (steps per loop iteration), tiny and 50M float32 models,
    the chunk settings interleaved within each repeat (the machine's noise hits them alike)."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    tiny = dataclasses.replace(SMALL, vocab_size=512, dim=64, n_layers=2, mlp_dim=128)
    for name, config in (("tiny", tiny), ("50M", SMALL)):
        params = random_params(config)
        sampler = Sampler(config, params, mesh)
        for b in batches:
            prompts = np.random.default_rng(1).integers(3, config.vocab_size, (b, 64)).tolist()
            times = {k: [] for k in chunks}
            for _ in range(repeats + 1):  # the first round compiles
                for k in chunks:
                    sampler.decode_chunk = k
                    times[k].append(measure(ours_fn(sampler, prompts), n_new, 1)[1])
            base = np.median(times[chunks[0]][1:])
            for k in chunks:
                step = np.median(times[k][1:])
                report(name, f"llama_jax decode_chunk={k}", b, 0.0, step)
                print(f"         x{base / step:.2f} vs decode_chunk={chunks[0]}", flush=True)
        del sampler, params
        gc.collect()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["small", "1b", "chunks"], default=None)
    p.add_argument("--chunks", default="1,8", help="decode_chunk values (--only chunks)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=32, help="new tokens timed, every row")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--tiny", action="store_true", help="toy model sizes (a smoke run)")
    args = p.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    )
    small, big = SMALL, get_config("llama3.2-1b")
    if args.tiny:
        small = dataclasses.replace(SMALL, vocab_size=512, dim=64, n_layers=2, mlp_dim=128)
        big = dataclasses.replace(small, tie_embeddings=True)
    if args.only == "chunks":
        chunks = tuple(int(k) for k in args.chunks.split(","))
        bench_chunks(chunks, args.new_tokens, args.repeats, batches)
    if args.only in (None, "small"):
        bench_model(
            "50M", small, 64, args.new_tokens, args.repeats,
            [("unrolled", dict(unroll=True)),
             ("scanned layers", dict(unroll=False, check=False)),
             ("int8", dict(quantize="int8", check=False))],
            batches,
        )  # fmt: skip
    if args.only in (None, "1b"):
        one_b = dataclasses.replace(big, param_dtype="bfloat16", dtype="bfloat16", max_seq_len=4096)
        bench_model(
            "1B", one_b, 64, args.new_tokens, args.repeats,
            [("bf16 (default)", dict()),
             ("float32 decode copy", dict(dtype="float32", check=False)),
             ("bf16 model layout", dict(layout="standard", check=False)),
             ("int8", dict(quantize="int8", check=False))],
            batches,
            bw_bytes=read_bandwidth(),
        )  # fmt: skip
    print("\nmodel  path                               batch  ttft ms  ms/step   tok/s")
    for r in ROWS:
        print(
            f"{r['model']:6s} {r['path']:34s} {r['batch']:5d} {r['ttft'] * 1e3:8.1f} "
            f"{r['step'] * 1e3:8.1f} {r['batch'] / r['step']:7.1f}"
        )


if __name__ == "__main__":
    main()
