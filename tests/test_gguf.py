"""GGUF reading against transformers' own GGUF loading and the gguf package, on small synthetic
files written with `gguf.GGUFWriter` + `gguf.quants.quantize`.

The one real model, SmolLM2-135M-Instruct's Q4_1 GGUF, is read in test_smollm2.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llama_jax import formats as convert  # noqa: E402
from llama_jax.api import Llama3  # noqa: E402
from llama_jax.formats.gguf import permute_qk  # noqa: E402
from llama_jax.model.config import ModelConfig  # noqa: E402


# ------------------------------------------------------------------ small synthetic files
def _tiny_hf(tied: bool, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _write_gguf(
    path,
    model,
    qtype_name: str,
    arch: str = "llama",
    vocab_size: int | None = None,
    rope_freqs=None,
):
    """A llama GGUF of an HF model; matrices in `qtype_name` where gguf can quantize them."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(vocab_size or c.vocab_size)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer[rest.rsplit('.', 1)[0]]}.weight"
        if "q_proj" in name:
            a = permute_qk(a, c.num_attention_heads)
        elif "k_proj" in name:
            a = permute_qk(a, c.num_key_value_heads)
        if a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "qtype,tied",
    [("F32", False), ("F16", True), ("BF16", False), ("Q8_0", True), ("Q4_0", False),
     ("Q4_1", True)],
)  # fmt: skip
def test_small_gguf_types_match_transformers(tmp_path, qtype, tied):
    model = _tiny_hf(tied)
    path = tmp_path / "m.gguf"
    _write_gguf(path, model, qtype)
    ours = Llama3.from_pretrained(str(path))
    assert ours.config.tie_embeddings == tied
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    ids = np.array([[1, 5, 9, 33, 2, 60, 7, 7]])
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours.logits(ids), want, atol=1e-4, rtol=0)


def test_bad_inputs_fail_in_one_line(tmp_path):
    model = _tiny_hf(True)
    good = tmp_path / "good.gguf"
    _write_gguf(good, model, "F32")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        convert.load_any(str(cut))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert.load_any(str(not_gguf))
    other = tmp_path / "other.gguf"
    _write_gguf(other, model, "F32", arch="qwen2")
    with pytest.raises(ValueError, match=r"'qwen2' is not supported; supported: llama"):
        convert.load_any(str(other))
    wrong_vocab = tmp_path / "vocab.gguf"
    _write_gguf(wrong_vocab, model, "F32", vocab_size=100)
    with pytest.raises(ValueError, match="disagrees with token_embd.weight's 64 rows"):
        convert.load_any(str(wrong_vocab))
    bad_type = tmp_path / "q5.gguf"
    _write_gguf(bad_type, model, "Q5_0")
    with pytest.raises(
        ValueError, match=r"tensor token_embd.weight has GGML type Q5_0, which is not supported"
    ):
        convert.load_any(str(bad_type))


def test_rope_freqs_give_llama31_scaling(tmp_path):
    from llama_jax.model.transformer import rope_inv_freq

    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    model = _tiny_hf(False)
    model.config.rope_theta = 500000.0
    model.config.rope_scaling = scaling
    model.config.rope_parameters = {"rope_theta": 500000.0, **scaling}
    ref = transformers.LlamaForCausalLM(model.config).eval()
    ref.load_state_dict(model.state_dict())
    hf_cfg = ModelConfig.from_hf(ref.config.to_dict())
    assert hf_cfg.rope_scaling_factor == 8.0
    plain = dataclasses.replace(hf_cfg, rope_scaling_factor=None)
    # The factors llama.cpp divides each frequency by, as its converter writes them.
    freqs = (rope_inv_freq(plain) / rope_inv_freq(hf_cfg)).astype(np.float32)
    path = tmp_path / "r.gguf"
    _write_gguf(path, ref, "F32", rope_freqs=freqs)
    ours = Llama3.from_pretrained(str(path))
    np.testing.assert_allclose(rope_inv_freq(ours.config), rope_inv_freq(hf_cfg), rtol=1e-6)
    ids = np.arange(40)[None] % 64
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours.logits(ids), want, atol=1e-4, rtol=0)
