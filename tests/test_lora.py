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

from llama_jax import formats
from llama_jax.formats import peft as peft_format
from llama_jax.model import lora
from llama_jax.model.config import get_config
from llama_jax.model.transformer import Transformer, init_params

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
    config, params = formats.load_hf(base_dir)
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


def _lora_grads(model_overrides, accum=1):
    """Adapter gradients of one train step and the base after it, under model_overrides."""
    import dataclasses

    import jax.numpy as jnp
    import ml_collections

    from llama_jax.model.transformer import unstack_layers
    from llama_jax.training import step as training_step
    from llama_jax.training import trainer as train
    from llama_jax.training.experiment import base_config

    cfg = dataclasses.replace(TINY, **model_overrides)
    c = base_config()
    c.grad_accum_steps = accum
    c.learning_rate, c.warmup_steps, c.num_steps = 1e-2, 0, 4
    c = ml_collections.ConfigDict(c)
    lcfg = lora.LoraConfig(rank=2, alpha=4.0)
    tx, schedule = train.make_tx(c, 4)
    # The same base and adapters in every layout: made stacked, unstacked when asked.
    base = nn.unbox(init_params(TINY, jax.random.key(0)))
    adapters = nn.unbox(lora.init_adapters(base, lcfg, jax.random.key(1)))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B non-zero: A gets gradients too
    if not cfg.scan_layers:
        base, adapters = unstack_layers(base, 2), unstack_layers(adapters, 2)
    state = {
        "params": adapters,
        "opt_state": tx.init(adapters),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(2)),
    }
    base_copy = jax.tree.map(np.array, base)
    toks = np.random.default_rng(3).integers(0, 128, size=(4, 17)).astype(np.int32)
    batch = {
        "inputs": jnp.asarray(toks[:, :-1]),
        "targets": jnp.asarray(toks[:, 1:]),
        "segment_ids": jnp.ones((4, 16), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16)),
        "loss_mask": jnp.ones((4, 16), jnp.float32),
    }
    step = jax.jit(training_step.make_train_step(cfg, tx, schedule, c, lcfg))
    new, metrics = step(state, batch, base)
    jax.tree.map(np.testing.assert_array_equal, base_copy, jax.tree.map(np.asarray, base))
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new["params"], state["params"])
    if not cfg.scan_layers:  # compare in the stacked layout
        delta = {
            "layers": jax.tree.map(
                lambda *a: np.stack(a), *[delta[f"layers_{i}"] for i in range(2)]
            )
        }
    return float(metrics["loss"]), delta


def test_lora_step_under_scan_remat_and_accumulation():
    loss0, d0 = _lora_grads({})
    assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(d0))  # every adapter moves
    for overrides, accum in (({"scan_layers": False}, 1), ({"remat_policy": "full"}, 1), ({}, 2)):
        loss, d = _lora_grads(overrides, accum)
        assert abs(loss - loss0) < 1e-5, (overrides, accum)  # Adam step 1 ~ lr * sign(g): 1e-2
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), d, d0)


def test_adapter_axes_come_from_the_boxed_weights():
    """A shards like its weight's inputs and B like its outputs, whatever the model declares."""
    boxed = init_params(TINY, jax.random.key(0))
    adapters = lora.init_adapters(boxed, lora.LoraConfig(rank=2), jax.random.key(1))
    layer, ad = boxed["layers"], adapters["layers"]
    assert ad["attention"]["wq"]["a"].names == ("layers", "embed", None)
    assert ad["attention"]["wq"]["b"].names == ("layers", None, "heads", "head_dim")
    assert ad["attention"]["wo"]["a"].names == ("layers", "heads", "head_dim", None)
    assert ad["mlp"]["w_down"]["b"].names == ("layers", None, "embed")
    for module, t in [("attention", "wk"), ("mlp", "w_gate")]:
        names = layer[module][t].names
        assert ad[module][t]["a"].names[:-1] == names[:2]
        assert ad[module][t]["b"].names[2:] == names[2:]


HF_MODULES = dict(
    zip(
        lora.TARGETS,
        [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")]
        + [("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")],
    )
)


class _FixedDropout(torch.nn.Module):
    """peft's lora_dropout with a given keep mask: x * keep / (1 - p), as nn.Dropout scales."""

    def __init__(self, keep: np.ndarray, p: float):
        super().__init__()
        self.keep, self.p = torch.tensor(keep, dtype=torch.float32), p

    def forward(self, x):
        return x * self.keep.reshape(x.shape) / (1.0 - self.p)


def test_dropout_equals_peft_in_train_mode_with_the_same_mask(pair):
    """Adapter dropout drops the adapter's input (not its output), scaled by 1 / (1 - p), with
    an independent mask per layer and target: peft in train mode with our masks agrees."""
    base_dir, model, adapter_dir = pair
    config, params, cfg, adapters = _ours(base_dir, adapter_dir)
    p, rng = 0.3, jax.random.key(7)
    cfg = lora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=p, targets=cfg.targets)
    adapted = lora.combine(params, adapters, cfg, rng)
    got = np.asarray(
        Transformer(config, dense=lora.lora_dense).apply({"params": adapted}, TOKENS)[0]
    )
    n, h, f = config.n_heads, config.head_dim, config.mlp_dim
    inputs = {t: (config.dim,) for t in ("wq", "wk", "wv", "w_gate", "w_up")}
    inputs |= {"wo": (n, h), "w_down": (f,)}
    # The masks lora_dense draws: bernoulli(key of (layer, target), 1 - p, x.shape).
    keys = {}
    for k, key in enumerate(sorted(adapters)):
        for t in cfg.targets:
            sub = jax.random.fold_in(rng, k * len(lora.TARGETS) + lora.TARGETS.index(t))
            if key == "layers":
                for layer, kl in enumerate(jax.random.split(sub, config.n_layers)):
                    keys[layer, t] = kl
            else:
                keys[int(key.removeprefix("layers_")), t] = sub
    layers = model.base_model.model.model.layers
    saved = {}
    try:
        for (layer, t), key in keys.items():
            module, proj = HF_MODULES[t]
            target = getattr(getattr(layers[layer], module), proj)
            keep = np.asarray(jax.random.bernoulli(key, 1.0 - p, (*TOKENS.shape, *inputs[t])))
            saved[layer, t] = target.lora_dropout["default"]
            target.lora_dropout["default"] = _FixedDropout(keep.reshape(*TOKENS.shape, -1), p)
        model.train()
        want = hf_logits(model, TOKENS)
    finally:
        model.eval()
        for (layer, t), original in saved.items():
            module, proj = HF_MODULES[t]
            getattr(getattr(layers[layer], module), proj).lora_dropout["default"] = original
    no_dropout = hf_logits(model, TOKENS)
    assert np.abs(no_dropout - want).max() > 1e-2  # the masks change the logits
    assert np.abs(got - want).max() <= 1e-4
