"""LoRA against Hugging Face peft on transformers' Llama (CPU, float32), and PEFT directories."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_reference import hf_logits, make_hf_model

from llama_jax import convert, lora, peft_format
from llama_jax.config import get_config
from llama_jax.model import Transformer, init_params

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 6.0  # scale 1.5


def _peft_model(base: transformers.LlamaForCausalLM, seed: int) -> peft.PeftModel:
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero: make the adapter do something
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(HF base dir, peft model, peft adapter dir) for a random tiny Llama."""
    tie = request.param
    root = tmp_path_factory.mktemp("tied" if tie else "untied")
    base_dir, adapter_dir = str(root / "base"), str(root / "adapter")
    base = make_hf_model(base_dir, seed=3, tie=tie, layout=5)
    model = _peft_model(base, seed=4)
    model.save_pretrained(adapter_dir)
    return base_dir, model, adapter_dir


TINY = get_config("tiny", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96)
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 24))


def _ours(base_dir: str, adapter_dir: str):
    config, params = convert.load_hf(base_dir)
    cfg, adapters = peft_format.load_peft(adapter_dir, config)
    return config, params, cfg, adapters


def test_forward_equals_peft_all_targets(pair):
    base_dir, model, adapter_dir = pair
    config, params, cfg, adapters = _ours(base_dir, adapter_dir)
    assert cfg.targets == lora.TARGETS and cfg.rank == RANK and cfg.scale == ALPHA / RANK
    want = hf_logits(model, TOKENS)
    adapted = lora.combine(params, adapters, cfg)
    got = np.asarray(
        Transformer(config, dense=lora.lora_dense).apply({"params": adapted}, TOKENS)[0]
    )
    base_only = np.asarray(Transformer(config).apply({"params": params}, TOKENS)[0])
    assert np.abs(base_only - want).max() > 1e-2  # the adapter changes the logits
    assert np.abs(got - want).max() <= 1e-4
    merged = lora.merge(params, adapters, cfg.scale)
    got_merged = np.asarray(Transformer(config).apply({"params": merged}, TOKENS)[0])
    assert np.abs(got_merged - want).max() <= 1e-4


def test_subset_of_targets_equals_peft(tmp_path):
    base = make_hf_model(str(tmp_path / "base"), seed=5, layout=5)
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "ad"))
    config, params, ours, adapters = _ours(str(tmp_path / "base"), str(tmp_path / "ad"))
    assert ours.targets == ("wv", "w_down")
    got = Transformer(config, dense=lora.lora_dense).apply(
        {"params": lora.combine(params, adapters, ours)}, TOKENS
    )[0]
    assert np.abs(np.asarray(got) - hf_logits(model, TOKENS)).max() <= 1e-4


def test_export_loads_in_peft(pair, tmp_path):
    base_dir, model, adapter_dir = pair
    config, params, cfg, adapters = _ours(base_dir, adapter_dir)
    out = str(tmp_path / "export")
    peft_format.save_peft(adapters, cfg, config, out)
    fresh = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(fresh, out).eval()
    assert np.abs(hf_logits(loaded, TOKENS) - hf_logits(model, TOKENS)).max() <= 1e-5


def test_init_is_identity():
    params = nn.unbox(init_params(TINY, jax.random.key(0)))
    cfg = lora.LoraConfig(rank=3, alpha=3.0)
    adapters = nn.unbox(lora.init_adapters(params, cfg, jax.random.key(1)))
    per_layer = sum(
        3 * (din + dout)
        for din, dout in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]
    )
    assert lora.count(adapters) == TINY.n_layers * per_layer
    y0 = Transformer(TINY).apply({"params": params}, TOKENS)[0]
    y1 = Transformer(TINY, dense=lora.lora_dense).apply(
        {"params": lora.combine(params, adapters, cfg)}, TOKENS
    )[0]
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))  # B = 0: exactly the base


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be an integer > 0"),
        (dict(targets=("wq", "q_proj")), "unknown lora target.*valid: wq, wk"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_bad_lora_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kwargs)
