"""One-off check (not CI): the README's demo model, exported to GGUF, runs in llama.cpp.

Exports a llama_jax model (by default: the README's Shakespeare demo model, trained briefly
here) with `llama3 convert --format gguf` as f32 and q8_0, runs each file in llama.cpp's
`llama-simple` (greedy), and compares its continuation with llama_jax's greedy one of the same
prompt (`llama3 generate --temperature 0`: the same prompt ids, BOS as the tokenizer says):
how many of llama_jax's first tokens llama.cpp's text reproduces, and whether the whole text
is equal. llama_jax also reads each exported file back, so a difference can be told apart
from the export. llama.cpp keeps its KV cache in f16, so a late divergence at f32 is possible.

Build llama.cpp's `llama-simple` once, e.g. from the sdist of llama-cpp-python (which vendors
llama.cpp; ~15 min on 2 cores):

  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp*.tar.gz
  cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release \\
      -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \\
      -DLLAMA_BUILD_SERVER=OFF && cmake --build build --target llama-simple -j2

then

  python bench/llamacpp_check.py --llama_cpp build/bin/llama-simple [--model_path RUN_DIR]

Without a binary (--llama_cpp, $LLAMA_CPP_SIMPLE or `llama-simple` on PATH) it prints why it
skipped and exits 0. Exit 1 when an f32 export's first `--min_equal` tokens differ.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = [sys.executable, "-m", "llama_jax.cli"]


def find_binary(given: str | None) -> str | None:
    for cand in (given, os.environ.get("LLAMA_CPP_SIMPLE"), shutil.which("llama-simple")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def train_demo(out: str, steps: int) -> None:
    """The README's demo model (experiments/shakespeare_tiny.py), `steps` steps only."""
    cmd = LLAMA3 + ["train", "--config", "experiments/shakespeare_tiny.py", "--model_path", out]
    cmd += [f"--config.num_steps={steps}", "--config.eval_every=0"]
    cmd += [f"--config.checkpoint_every={steps}"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def export(model_path: str, out: str, gguf_type: str) -> None:
    cmd = LLAMA3 + ["convert", "--input", model_path, "--output", out, "--format", "gguf"]
    cmd += ["--gguf_type", gguf_type]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def llama_cpp_text(binary: str, gguf: str, prompt: str, n: int) -> str:
    """llama-simple's greedy continuation of `prompt` (it echoes the prompt's pieces first,
    BOS included, then the new pieces, then a newline; it stops early at end of generation)."""
    proc = subprocess.run(
        [binary, "-m", gguf, "-n", str(n), prompt], capture_output=True, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-3000:]
        raise SystemExit(f"llama.cpp failed on {gguf} (exit {proc.returncode}):\n{tail}")
    out = proc.stdout.decode("utf-8", errors="replace")
    at = out.find(prompt)
    if at < 0:
        raise SystemExit(f"llama.cpp's output does not echo the prompt {prompt!r}: {out[:300]!r}")
    text = out[at + len(prompt) :]
    return text[:-1] if text.endswith("\n") else text


def ours(model, prompt: str, n: int) -> tuple[list[int], list[str]]:
    """llama_jax's greedy new ids for `prompt` (as `llama3 generate --temperature 0` makes
    them) and, for each k, the text of the first k of them."""
    tok = model.tokenizer
    ids = model._encode_prompts([prompt])[0]
    new = model.sampler().generate_ids([ids], n, stop_ids=tok.stop_ids)[0]
    head = tok.decode(ids)
    texts = [tok.decode(ids + new[:k])[len(head) :] for k in range(len(new) + 1)]
    return new, texts


def agreement(texts: list[str], theirs: str) -> int:
    """How many of our first tokens llama.cpp's text reproduces (text prefix equality)."""
    k = 0
    while k + 1 < len(texts) and theirs.startswith(texts[k + 1]):
        k += 1
    return k


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama_cpp", default=None, help="path of llama.cpp's llama-simple")
    p.add_argument("--model_path", default=None, help="default: train the demo model briefly")
    p.add_argument("--train_steps", type=int, default=60, help="when training the demo model")
    p.add_argument("--work_dir", default=None, help="default: a temporary directory")
    p.add_argument("--prompt", action="append", default=None, help="default: two demo prompts")
    p.add_argument("--n", type=int, default=32, help="new tokens")
    p.add_argument("--types", default="f32,q8_0")
    p.add_argument("--min_equal", type=int, default=20, help="f32: tokens that must be equal")
    args = p.parse_args()
    binary = find_binary(args.llama_cpp)
    if binary is None:
        print(
            "skipped: no llama.cpp binary (give --llama_cpp PATH to llama-simple, set "
            "$LLAMA_CPP_SIMPLE, or put llama-simple on PATH; how to build it: see this "
            "script's docstring)"
        )
        return 0
    sys.path.insert(0, REPO)
    from llama_jax import Llama3

    prompts = args.prompt or ["ROMEO:", "To be, or not to be"]
    work = args.work_dir or tempfile.mkdtemp(prefix="llamacpp_check_")
    model_path = args.model_path
    if model_path is None:
        model_path = os.path.join(work, "shakespeare_tiny")
        train_demo(model_path, args.train_steps)
    ref = Llama3.from_pretrained(model_path, dtype="float32")
    ok = True
    print(f"\nllama.cpp: {binary}\nmodel: {model_path}\n")
    for gguf_type in args.types.split(","):
        out = os.path.join(work, f"model-{gguf_type}.gguf")
        export(model_path, out, gguf_type)
        back = Llama3.from_pretrained(out, dtype="float32")  # our reader on our export
        for prompt in prompts:
            new, texts = ours(ref, prompt, args.n)
            new_back, _ = ours(back, prompt, args.n)
            theirs = llama_cpp_text(binary, out, prompt, args.n)
            k = agreement(texts, theirs)
            whole = texts[-1] == theirs
            back_same = next((i for i, (a, b) in enumerate(zip(new, new_back)) if a != b), None)
            back_note = "all equal" if back_same is None and len(new) == len(new_back) else (
                f"first difference at token {back_same}"
            )  # fmt: skip
            print(
                f"{gguf_type:5s} {prompt!r}: llama.cpp reproduces the first {k}/{len(new)} "
                f"greedy tokens of llama_jax (whole text equal: {whole}); llama_jax on the "
                f"exported file vs the run: {back_note}"
            )
            print(f"      llama_jax: {texts[-1]!r}\n      llama.cpp: {theirs!r}", flush=True)
            if gguf_type == "f32" and k < min(args.min_equal, len(new)):
                ok = False
    print("PASS" if ok else f"FAIL: an f32 export differs within the first {args.min_equal}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
