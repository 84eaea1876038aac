"""Builds random-initialised Hugging Face Llama checkpoints for the reference tests."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers


def hf_config(
    *,
    vocab=128,
    dim=64,
    layers=2,
    heads=4,
    kv_heads=2,
    mlp=96,
    tie=False,
    rope_scaling=False,
    max_pos=128,
    layout=4,
) -> transformers.LlamaConfig:
    kw = dict(
        vocab_size=vocab,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if rope_scaling == "meta":  # what Meta's reference hard-codes for use_scaled_rope
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    elif rope_scaling:
        # original context 16: the tests run sequences of 40+, past it.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    return transformers.LlamaConfig(**kw, rope_parameters=rope)


def make_hf_model(path: str, seed: int = 0, layout: int = 5, **kw) -> transformers.LlamaForCausalLM:
    """Saves a random HF Llama at `path`; layout 4 rewrites config.json as transformers 4 did."""
    torch.manual_seed(seed)
    cfg = hf_config(**kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random norms too, so a norm mapped to the wrong place cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if layout == 4:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    return model


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
