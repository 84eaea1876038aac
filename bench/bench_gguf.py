"""SmolLM2-135M-Instruct from its GGUF file: llama_jax against transformers, side by side.

One run, the same GGUF file (the built-in `smollm2-135m-instruct`: Q4_1 projections, a Q8_0
embedding, F32 norms, dequantised by both on load):

1. Load: wall time and peak RSS of `Llama3.from_pretrained(gguf)` against transformers'
   `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`, each in a fresh
   subprocess (imports timed apart; peak RSS from getrusage, also given above the RSS after
   imports), then the tokenizer out of the same file (ours: `GGUFTokenizer`; transformers:
   `AutoTokenizer.from_pretrained(dir, gguf_file=...)`). The file is read once beforehand so
   both find it in the page cache.
2. Decode: greedy tokens/s at batch 1 and 8 for float32, bfloat16 and int8 (ours:
   `quantize="int8"` on float32; transformers: torch's dynamic int8 `nn.Linear` quantisation)
   on the same dequantised weights (transformers' model is loaded from the GGUF; the first
   greedy tokens are compared), and the share of the measured read bandwidth each reaches:
   weight bytes read per decode step (every projection, the norms and the output head, in
   the layout each engine decodes with; not the embedding lookup, not the KV cache) x steps
   per second / bandwidth, where the bandwidth is the best of a 1 GiB numpy sum (one thread)
   and jitted jax sums (all threads).

Method: ttft = time of a 1-token generation; decode s/step = (time(N tokens) - ttft) / (N - 1);
medians of `--repeats` runs after a warm-up (which also compiles). Prints numbers and ratios;
asserts nothing. Run it with `nice` on a quiet machine; compare within one run.

  python bench/bench_gguf.py                      # ~10 minutes on 2 CPUs
  python bench/bench_gguf.py --only load
  python bench/bench_gguf.py --only decode --batches 1 --new_tokens 16
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
FILLER = " ".join(["In the beginning the quick brown fox jumped over the lazy dog."] * 4)


def rss_bytes() -> int:
    """The current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------- load (children)
def child_load(impl: str, path: str) -> dict:
    """In a fresh process: import, load the model, then the tokenizer; times and RSS."""
    t0 = time.perf_counter()
    if impl == "llama_jax":
        import jax

        from llama_jax import Llama3
        from llama_jax.tokenizer.gguf import GGUFTokenizer
    else:
        import torch
        import transformers
    t_import = time.perf_counter() - t0
    rss_import = rss_bytes()
    t0 = time.perf_counter()
    if impl == "llama_jax":
        model = Llama3.from_pretrained(path)
        jax.block_until_ready(model.params)
        n = sum(x.size for x in jax.tree.leaves(model.params))
    else:
        d, name = os.path.split(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file=name, dtype=torch.float32
        )
        n = sum(p.numel() for p in model.parameters())
    t_model = time.perf_counter() - t0
    peak_model = peak_rss_bytes()
    t0 = time.perf_counter()
    if impl == "llama_jax":
        ids = GGUFTokenizer(path).encode(PROMPT)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
        ids = tok(PROMPT)["input_ids"]
    t_tok = time.perf_counter() - t0
    return dict(
        import_s=t_import,
        model_s=t_model,
        tokenizer_s=t_tok,
        rss_import=rss_import,
        peak_model=peak_model,
        peak_all=peak_rss_bytes(),
        params=int(n),
        ids=list(map(int, ids)),
    )


def bench_load(path: str, repeats: int) -> None:
    with open(path, "rb") as f:  # into the page cache, for both alike
        while f.read(1 << 24):
            pass
    size = os.path.getsize(path)
    print(f"\n== load: {path} ({size / 1e6:.0f} MB), each in a fresh process, best of {repeats}")
    res = {}
    for impl in ("llama_jax", "transformers"):
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--_child", impl, path],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                print(f"{impl}: failed:\n{out.stderr[-3000:]}")
                break
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not runs:
            continue
        best = min(runs, key=lambda r: r["model_s"])
        best["peak_all"] = min(r["peak_all"] for r in runs)
        best["peak_model"] = min(r["peak_model"] for r in runs)
        res[impl] = best
        above = (best["peak_model"] - best["rss_import"]) / 2**20
        print(
            f"{impl:12s} import {best['import_s']:5.1f} s | model {best['model_s']:5.2f} s, "
            f"peak RSS {best['peak_model'] / 2**20:6.0f} MiB ({above:5.0f} above imports) | "
            f"tokenizer {best['tokenizer_s']:5.2f} s | peak with tokenizer "
            f"{best['peak_all'] / 2**20:6.0f} MiB | {best['params'] / 1e6:.1f}M params",
            flush=True,
        )
    if len(res) == 2:
        a, b = res["llama_jax"], res["transformers"]
        print(
            f"ratios (transformers / llama_jax): model load x{b['model_s'] / a['model_s']:.2f}, "
            f"tokenizer x{b['tokenizer_s'] / a['tokenizer_s']:.2f}, peak RSS "
            f"x{b['peak_model'] / a['peak_model']:.2f} (above imports "
            f"x{(b['peak_model'] - b['rss_import']) / (a['peak_model'] - a['rss_import']):.2f}); "
            f"prompt ids equal: {a['ids'] == b['ids']}"
        )


# ----------------------------------------------------------------------------- decode
def read_bandwidth(repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of a 1 GiB numpy sum (one thread) and two jitted
    jax reductions of the same array (all threads)."""
    import jax
    import jax.numpy as jnp

    def best(fn):
        fn()
        return min(_timed(fn) for _ in range(repeats))

    held = [np.ones(1 << 28, np.float32)]  # 1 GiB
    rates = {"numpy sum": (1 << 30) / best(lambda: held[0].sum())}
    held[0] = jnp.asarray(held[0])
    for name, f in (
        ("jax sum", jax.jit(jnp.sum)),
        ("jax row sums", jax.jit(lambda v: v.reshape(-1, 4096).sum(axis=1))),
    ):
        rates[name] = (1 << 30) / best(lambda f=f: f(held[0]).block_until_ready())
    held.clear()
    gc.collect()
    print("read bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in rates.items()))
    return max(rates.values())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    return float(np.median([_timed(fn) for _ in range(repeats)]))


def measure(generate, n_new: int, repeats: int) -> tuple[float, float]:
    """(ttft s, decode s per step) of generate(n)."""
    ttft = time_it(lambda: generate(1), repeats)
    total = time_it(lambda: generate(n_new), repeats)
    return ttft, max(total - ttft, 1e-9) / (n_new - 1)


def ours_step_bytes(sampler) -> int:
    """Weight bytes one decode step reads: every leaf of the decode params but the embedding
    table, plus the table itself when it is also the (float) output head."""
    import jax

    from llama_jax.inference.decode_layout import TIED_HEAD

    p = sampler.params
    total = sum(x.nbytes for x in jax.tree.leaves(p))
    emb = p["embedding"].nbytes
    head_is_table = sampler.config.tie_embeddings and TIED_HEAD not in p
    return total - (0 if head_is_table else emb)


def hf_step_bytes(model) -> int:
    """The same for a transformers model: every Linear (the head included; dynamic int8
    Linears by their packed int8 weight and float scales) and every norm weight."""
    import torch

    total = 0
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "LlamaRMSNorm":
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        elif hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            # a torch.ao dynamic quantized Linear (not its LinearPackedParams child)
            w = m.weight()
            per_channel = w.qscheme() in (
                torch.per_channel_affine,
                torch.per_channel_affine_float_qparams,
            )  # quantize_dynamic's default is one scale per tensor
            scales = w.q_per_channel_scales().numel() if per_channel else 1
            total += w.numel() * w.element_size() + scales * 8
    return total


def hf_generate(model, prompts):
    import torch

    ids = torch.tensor(prompts)

    def run(n):
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=2,
            )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    return run


def bench_decode(path: str, batches, n_new: int, repeats: int) -> None:
    import jax
    import torch
    import transformers

    from llama_jax import Llama3

    print(
        f"\n== decode: jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    )
    bw = read_bandwidth()
    d, name = os.path.split(path)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32
    ).eval()
    base = Llama3.from_pretrained(path)  # float32, the tokenizer from the file
    prompt = base.tokenizer.encode(PROMPT)
    # rows of one length that differ: a few ids of ordinary text, then the prompt
    filler = base.tokenizer.encode(FILLER)
    assert len(filler) >= max(batches) + 4, "FILLER too short for the largest batch"
    prompts = {b: [filler[i : i + 4] + prompt for i in range(b)] for b in batches}
    rows = []
    for dtype in ("float32", "bfloat16", "int8"):
        if dtype == "bfloat16":
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                d, gguf_file=name, dtype=torch.bfloat16
            ).eval()
        elif dtype == "int8":
            try:
                hf = torch.ao.quantization.quantize_dynamic(
                    hf32, {torch.nn.Linear}, dtype=torch.qint8
                )
            except Exception as e:  # noqa: BLE001 - an old or trimmed torch: no int8 row
                print(f"transformers int8: torch dynamic quantisation unavailable ({e})")
                hf = None
        else:
            hf = hf32
        if dtype == "int8":
            ours = Llama3.from_pretrained(path, dtype="float32", quantize="int8")
        else:
            ours = Llama3.from_pretrained(path, dtype=dtype)
        sampler = ours.sampler()
        ours_bytes = ours_step_bytes(sampler)
        hf_bytes = hf_step_bytes(hf) if hf is not None else 0
        if hf is not None:
            a = sampler.generate_ids(prompts[batches[0]][:1], 16)[0]
            b = hf_generate(hf, prompts[batches[0]][:1])(16)[0]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 16)
            print(f"{dtype}: first greedy tokens equal: {same}/16 (prompt {PROMPT!r})")
        for bsz in batches:
            ours_gen = lambda n, s=sampler, b=bsz: s.generate_ids(prompts[b], n)  # noqa: E731
            hf_gen = hf_generate(hf, prompts[bsz]) if hf is not None else None
            for who, gen, nbytes in (
                ("llama_jax", ours_gen, ours_bytes),
                ("transformers", hf_gen, hf_bytes),
            ):
                if gen is None:
                    continue
                ttft, step = measure(gen, n_new, repeats)
                share = nbytes / step / bw
                rows.append((dtype, who, bsz, ttft, step, nbytes, share))
                print(
                    f"{dtype:8s} {who:12s} B={bsz}: ttft {ttft * 1e3:7.1f} ms, "
                    f"{step * 1e3:6.2f} ms/step, {bsz / step:7.1f} tok/s, "
                    f"{nbytes / 1e6:5.0f} MB/step -> {share * 100:4.1f}% of read bandwidth",
                    flush=True,
                )
        del ours, sampler
        gc.collect()
    head = f"{'dtype':8s} {'batch':>5s} {'llama_jax tok/s':>16s} {'transformers':>13s}"
    print(f"\n{head} {'ratio':>6s}  {'bw share ours / theirs':>22s}")
    by = {(r[0], r[1], r[2]): r for r in rows}
    for dtype in ("float32", "bfloat16", "int8"):
        for bsz in batches:
            o, t = by.get((dtype, "llama_jax", bsz)), by.get((dtype, "transformers", bsz))
            if o is None:
                continue
            ours_tps = bsz / o[4]
            theirs = f"{bsz / t[4]:13.1f} {t[4] / o[4]:5.2f}x" if t else f"{'-':>13s} {'-':>6s}"
            shares = f"{o[6] * 100:.1f}% / " + (f"{t[6] * 100:.1f}%" if t else "-")
            print(f"{dtype:8s} {bsz:5d} {ours_tps:16.1f} {theirs}  {shares:>22s}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help="a GGUF file or a built-in model name")
    p.add_argument("--only", choices=["load", "decode"], default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load_repeats", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child_load(*args._child)))
        return
    from llama_jax.data.builtin_models import resolve_model_path

    path = resolve_model_path(args.model, "--model")
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}; {os.cpu_count()} CPUs")
    if args.only in (None, "load"):
        bench_load(path, args.load_repeats)
    if args.only in (None, "decode"):
        batches = tuple(int(b) for b in args.batches.split(","))
        bench_decode(path, batches, args.new_tokens, args.repeats)
    with open("/proc/loadavg") as f:
        print(f"load average at end: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
