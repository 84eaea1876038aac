"""The model against Hugging Face transformers, Meta checkpoints, meshes and the KV cache."""

import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_logits, make_hf_model

from llama_jax import Llama3, formats
from llama_jax.model import sharding
from llama_jax.model.config import PUBLISHED_SIZES, ModelConfig, get_config
from llama_jax.model.transformer import (
    Transformer,
    init_cache,
    init_params,
    stack_layers,
    unstack_layers,
)

RNG = np.random.RandomState(0)


def _tokens(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


HF_CASES = {
    "gqa": dict(heads=4, kv_heads=2),
    "mha": dict(heads=4, kv_heads=4),
    "mqa": dict(heads=4, kv_heads=1),
    "gqa-tied-layout4": dict(heads=4, kv_heads=2, tie=True, layout=4),
    "rope-scaled": dict(heads=4, kv_heads=2, rope_scaling=True),
    "rope-scaled-tied-layout4": dict(heads=8, kv_heads=2, rope_scaling=True, tie=True, layout=4),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(tmp_path, case):
    kw = HF_CASES[case]
    hf = make_hf_model(str(tmp_path), **kw)
    model = Llama3.from_pretrained(str(tmp_path), dtype="float32")
    assert model.config.tie_embeddings == kw.get("tie", False)
    assert (model.config.rope_scaling_factor is not None) == kw.get("rope_scaling", False)
    # 72 tokens: past the scaled models' original context of 16.
    tokens = _tokens(128, (2, 72))
    diff = np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max()
    assert diff <= 1e-4, diff


def _meta_from_hf(hf_model, path, n_shards=2, use_scaled_rope=False):
    """Writes Meta's layout (interleaved rotary rows, model-parallel shards) from HF weights,
    split the way Llama 3's reference (fairscale) splits them: tok_embeddings is a
    VocabParallelEmbedding (dim 0), wq/wk/wv/w1/w3/output column-parallel (dim 0), wo/w2
    row-parallel (dim 1), norms replicated."""
    cfg = hf_model.config
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads

    def unpermute(w, heads):  # HF half-split -> Meta interleaved: inverse of the import step
        rows, cols = w.shape
        return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    sd = hf_model.state_dict()
    meta = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    names = {
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
    }
    for i in range(cfg.num_hidden_layers):
        for hf_name, m_name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if m_name == "attention.wq":
                w = unpermute(w, n)
            elif m_name == "attention.wk":
                w = unpermute(w, k)
            meta[f"layers.{i}.{m_name}.weight"] = w
    column = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")
    shards = [{} for _ in range(n_shards)]
    for name, w in meta.items():
        kind = name.split(".")[-2]
        if w.ndim == 1:
            parts = [w] * n_shards
        else:
            parts = torch.chunk(w, n_shards, dim=0 if kind in column else 1)
        for s, p in zip(shards, parts):
            s[name] = p.clone()
    os.makedirs(path, exist_ok=True)
    for i, s in enumerate(shards):
        torch.save(s, os.path.join(path, f"consolidated.{i:02d}.pth"))
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": n,
        "n_kv_heads": k,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 32,
        "ffn_dim_multiplier": None,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": 500000.0,
        "use_scaled_rope": use_scaled_rope,
    }
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)


@pytest.mark.parametrize("n_shards", [2, 4])
def test_meta_checkpoint_matches_transformers(tmp_path, n_shards):
    # dim 64: Meta's rule gives int(2 * 4 * 64 / 3) = 170 rounded up to 192 (multiple_of 32).
    # use_scaled_rope: Meta's hard-coded Llama 3.1 scaling (factor 8, original context 8192),
    # which with head dim 16 and theta 5e5 rescales the low-frequency half of the pairs.
    hf = make_hf_model(str(tmp_path / "hf"), heads=4, kv_heads=4, mlp=192, rope_scaling="meta")
    _meta_from_hf(hf, str(tmp_path / "meta"), n_shards=n_shards, use_scaled_rope=True)
    model = Llama3.from_pretrained(str(tmp_path / "meta"), dtype="float32")
    assert model.config.mlp_dim == 192 and model.config.rope_scaling_factor == 8.0
    tokens = _tokens(128, (2, 40))
    diff = np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_is_bit_identical(tmp_path, dtype):
    hf_dir, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
    hf = make_hf_model(str(hf_dir), heads=4, kv_heads=2)
    if dtype == "bfloat16":
        hf.to(torch.bfloat16).save_pretrained(str(hf_dir))
    from llama_jax.cli import main

    assert main(["convert", "--input", str(hf_dir), "--output", str(ours)]) == 0
    assert main(["convert", "--input", str(ours), "--output", str(back), "--format", "hf"]) == 0
    a = formats.SafetensorsFile(str(hf_dir / "model.safetensors"))
    b = formats.SafetensorsFile(str(back / "model.safetensors"))
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():  # noqa: SIM118 - SafetensorsFile is not a dict
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    # And transformers loads what we wrote, with the same outputs.
    import transformers

    def load(path):
        return transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    tokens = _tokens(128, (1, 16))
    np.testing.assert_array_equal(hf_logits(load(back), tokens), hf_logits(load(hf_dir), tokens))


def test_sharded_hf_checkpoint(tmp_path):
    hf = make_hf_model(str(tmp_path / "hf"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    model = Llama3.from_pretrained(str(tmp_path / "sharded"), dtype="float32")
    tokens = _tokens(128, (1, 20))
    assert np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max() <= 1e-4


# ----------------------------------------------------------------------------- meshes
def _tiny(**kw):
    return get_config("tiny", n_heads=4, n_kv_heads=2, **kw)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_unsharded(mesh_shape):
    config = _tiny()
    params = nn.unbox(init_params(config, jax.random.key(1)))
    tokens = _tokens(config.vocab_size, (8, 32))
    ref = Llama3(config=config, params=params, dtype="float32").logits(tokens)
    model = Llama3(config=config, params=params, dtype="float32", mesh_shape=mesh_shape)
    spec = model.params["layers"]["attention"]["wq"].sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    out = model.logits(tokens)
    assert np.abs(out - ref).max() <= 1e-5


def test_sharded_init_places_params_on_mesh():
    config = _tiny()
    mesh = sharding.make_mesh((2, 2, 2))
    params, shardings = sharding.sharded_init(
        lambda k: init_params(config, k), mesh, jax.random.key(0)
    )
    wq = params["layers"]["attention"]["wq"]
    assert wq.shape == (2, 64, 4, 16)
    assert wq.sharding == shardings["layers"]["attention"]["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)


# ----------------------------------------------------------------------------- attention
def test_packed_segments_equal_separate_sequences():
    config = _tiny()
    params = nn.unbox(init_params(config, jax.random.key(2)))
    model = Transformer(config)
    a, b = _tokens(256, (1, 10), 1), _tokens(256, (1, 14), 2)
    packed = np.concatenate([a, b], axis=1)
    seg = np.array([[1] * 10 + [2] * 14])
    pos = np.array([list(range(10)) + list(range(14))])
    out, _ = model.apply({"params": params}, packed, pos, seg)
    ref_a, _ = model.apply({"params": params}, a)
    ref_b, _ = model.apply({"params": params}, b)
    np.testing.assert_allclose(out[:, :10], ref_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 10:], ref_b, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_equals_full_forward(scan):
    config = _tiny(scan_layers=scan, rope_scaling_factor=8.0, rope_original_max_len=8)
    params = nn.unbox(init_params(dataclasses.replace(config, scan_layers=True), jax.random.key(3)))
    if not scan:
        params = unstack_layers(params, config.n_layers)
    model = Transformer(config)
    lengths = [7, 12]  # two prompts of different lengths, right-padded
    total = 20
    seqs = _tokens(256, (2, total), 4)
    full = [model.apply({"params": params}, seqs[i : i + 1])[0][0] for i in range(2)]

    cache = init_cache(config, batch_size=2, max_len=32)
    prompt = seqs[:, : max(lengths)].copy()
    logits, cache = model.apply({"params": params}, prompt, cache=cache)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i, :n], full[i][:n], atol=1e-5)
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, cache=c))
    pos = np.array(lengths)
    while pos.max() < total:
        tok = seqs[np.arange(2), np.minimum(pos, total - 1)][:, None]
        logits, cache = step(params, tok, pos[:, None], cache)
        for i in range(2):
            if pos[i] < total:
                np.testing.assert_allclose(logits[i, 0], full[i][pos[i]], atol=1e-5)
        pos = pos + 1


def test_stack_unstack_round_trip():
    config = _tiny()
    params = nn.unbox(init_params(config, jax.random.key(0)))
    back = stack_layers(unstack_layers(params, 2), 2)
    jax.tree.map(np.testing.assert_array_equal, params, back)


@pytest.mark.parametrize("policy", ["full", "dots", "save_qkv_proj"])
def test_remat_policies_give_the_same_gradients(policy):
    config = _tiny()
    params = nn.unbox(init_params(config, jax.random.key(0)))
    tokens = _tokens(256, (2, 16))

    def loss(p, cfg):
        logits, _ = Transformer(cfg).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    ref = jax.grad(loss)(params, config)
    got = jax.grad(loss)(params, dataclasses.replace(config, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, got)


# ----------------------------------------------------------------------------- presets
# Published architectures (Meta's model cards / params.json, the Hub's config.json):
# (vocab V, dim D, layers L, heads N, kv heads K, head dim H, mlp F, tied embeddings), and the
# exact parameter counts of the released checkpoints (transformers' num_parameters()).
PUBLISHED = {
    "llama3-8b": ((128256, 4096, 32, 32, 8, 128, 14336, False), 8_030_261_248),
    "llama3.1-8b": ((128256, 4096, 32, 32, 8, 128, 14336, False), 8_030_261_248),
    "llama3-70b": ((128256, 8192, 80, 64, 8, 128, 28672, False), 70_553_706_496),
    "llama3.1-70b": ((128256, 8192, 80, 64, 8, 128, 28672, False), 70_553_706_496),
    "llama3.3-70b": ((128256, 8192, 80, 64, 8, 128, 28672, False), 70_553_706_496),
    "llama3.1-405b": ((128256, 16384, 126, 128, 8, 128, 53248, False), 405_853_388_800),
    "llama3.2-1b": ((128256, 2048, 16, 32, 8, 64, 8192, True), 1_235_814_400),
    "llama3.2-3b": ((128256, 3072, 28, 24, 8, 128, 8192, True), 3_212_749_824),
}


def _published_count(v, d, n_layers, n, k, h, f, tied):
    """Embedding (+ untied output), final norm, and per layer: two norms, q/k/v/o, SwiGLU."""
    per_layer = 2 * d + d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    return v * d * (1 if tied else 2) + d + n_layers * per_layer


def test_every_preset_with_a_published_size_is_checked():
    assert set(PUBLISHED) == set(PUBLISHED_SIZES)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_eval_shape(name):
    arch, published = PUBLISHED[name]
    assert _published_count(*arch) == published  # the table above is consistent
    config = get_config(name)
    v, d, n_layers, n, k, h, f, tied = arch
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads) == (v, d, n_layers, n)
    assert (config.n_kv_heads, config.head_dim, config.mlp_dim) == (k, h, f)
    assert config.tie_embeddings == tied
    # Abstract: no memory, no compute, even for 405B.
    shapes = jax.eval_shape(lambda k: nn.unbox(init_params(config, k)), jax.random.key(0))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == published
    assert config.param_count() == published


def test_config_json_round_trip():
    c = get_config("llama3.1-8b")
    assert ModelConfig.from_dict(json.loads(c.to_json())) == c
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_from_hf_reads_real_llama_3_2_1b_config():
    # The Hub's Llama-3.2-1B config.json (transformers 4 layout), abridged to what is read.
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert ModelConfig.from_hf(hf) == get_config("llama3.2-1b")


def test_from_meta_reads_llama_3_1_8b_params():
    params = {
        "dim": 4096,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "n_heads": 32,
        "n_kv_heads": 8,
        "n_layers": 32,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": 128256,
    }
    c = ModelConfig.from_meta(params)
    assert c == get_config("llama3.1-8b")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
    ],
)
def test_unsupported_hf_configs_are_rejected(tmp_path, change, message):
    make_hf_model(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        c = json.load(f)
    c.update(change)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(c, f)
    with pytest.raises(ValueError, match=message):
        Llama3.from_pretrained(str(tmp_path))


def test_missing_shard_is_named(tmp_path):
    hf = make_hf_model(str(tmp_path / "hf"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    victim = sorted(p for p in os.listdir(tmp_path / "sharded") if p.endswith(".safetensors"))[1]
    os.remove(tmp_path / "sharded" / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        Llama3.from_pretrained(str(tmp_path / "sharded"))


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
    make_hf_model(str(tmp_path), mlp=96)
    with open(tmp_path / "config.json") as f:
        c = json.load(f)
    c["intermediate_size"] = 128
    with open(tmp_path / "config.json", "w") as f:
        json.dump(c, f)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\).*\(128, 64\)"):
        Llama3.from_pretrained(str(tmp_path))


def test_tensor_axis_must_divide_heads():
    config = get_config("tiny", n_heads=4, n_kv_heads=1)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="n_kv_heads=1 is not divisible by the mesh's tensor"):
        Llama3(config=config, params=params, mesh_shape=(1, 4, 2))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        Llama3.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Llama3.from_pretrained(str(tmp_path / "nope"))


def test_out_of_vocab_tokens_are_rejected():
    config = _tiny()
    model = Llama3(config=config, params=nn.unbox(init_params(config, jax.random.key(0))))
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        model.logits(np.array([[1, 300]]))
