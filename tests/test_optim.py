"""optim.py against numbers worked out by hand and against torch.optim.AdamW."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import formats
from llama_jax.model.config import get_config
from llama_jax.model.transformer import init_params
from llama_jax.training import optim

# ----------------------------------------------------------------------------- schedules
# lr 1e-3, 100 steps, 10 warmup steps, min_lr_ratio 0.1 (end value 1e-4), WSD decay over the
# last 20% (steps 80..100). Each value below is written out from the schedule's definition:
#   warmup   lr * s / 10                              for s < 10
#   cosine   1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + cos(pi * (s - 10) / 90))
#   wsd      1e-3 until step 80, then 1e-3 - (1e-3 - 1e-4) * (s - 80) / 20
HAND_LRS = {
    "cosine": {
        0: 0.0,
        5: 5e-4,  # halfway through warmup
        10: 1e-3,  # peak
        40: 7.75e-4,  # cos(pi/3) = 1/2: 1e-4 + 0.45e-3 * 1.5
        55: 5.5e-4,  # cos(pi/2) = 0: halfway between peak and floor
        100: 1e-4,  # the floor
    },
    "constant": {0: 0.0, 3: 3e-4, 10: 1e-3, 57: 1e-3, 100: 1e-3},
    "wsd": {
        0: 0.0,
        7: 7e-4,
        10: 1e-3,
        79: 1e-3,  # still stable
        80: 1e-3,  # decay starts
        85: 7.75e-4,  # a quarter down: 1e-3 - 0.9e-3 / 4
        90: 5.5e-4,
        100: 1e-4,
    },
}


@pytest.mark.parametrize("name", sorted(HAND_LRS))
def test_schedules_match_hand_computed_values(name):
    schedule = optim.make_schedule(
        name, 1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2
    )
    for step, want in HAND_LRS[name].items():
        got = float(schedule(step))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (name, step, got, want)


def test_schedules_without_warmup_start_at_the_peak():
    # cosine over 4 steps from 1e-2 to 1e-3: 1e-3 + 4.5e-3 * (1 + cos(pi * s / 4))
    cos = optim.make_schedule("cosine", 1e-2, total_steps=4, warmup_steps=0, min_lr_ratio=0.1)
    for s, want in {0: 1e-2, 2: 5.5e-3, 4: 1e-3}.items():
        assert float(cos(s)) == pytest.approx(want, rel=1e-6)
    assert float(optim.make_schedule("constant", 2e-3, 10)(7)) == pytest.approx(2e-3)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="schedule 'linear'; valid"):
        optim.make_schedule("linear", 1e-3, 10)
    with pytest.raises(ValueError, match="learning_rate must be > 0, got 0"):
        optim.make_schedule("cosine", 0, 10)


# ----------------------------------------------------------------------------- AdamW
def _shapes(config):
    """The real param tree, abstractly (no init compute)."""
    return nn.unbox(jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0)))


def _cosine_lr(step, peak=1e-2, floor=1e-3, total=4):
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * step / total))


def test_adamw_steps_match_torch_with_norms_excluded_from_decay():
    """Three AdamW steps on a real (tiny) param tree against torch.optim.AdamW.

    torch gets two parameter groups: weight decay for every matrix, none for the RMSNorm scales
    (whose stacked [L, D] leaves are 2-D in our tree, so "is it a matrix" alone would decay
    them). Gradients have global norms of 3..12, so the 1.0 clip is active on every step and
    scales them differently each time (torch: clip_grad_norm_). The learning rate follows a
    cosine schedule, evaluated at 0, 1, 2 (the optimizer's step count) on the torch side.
    """
    config = get_config(
        "tiny", vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=24
    )
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda a: (1.0 + 0.1 * rng.randn(*a.shape)).astype(np.float32), _shapes(config)
    )
    grads = [
        jax.tree.map(lambda a, s=s: (rng.randn(*a.shape) * s).astype(np.float32), params)
        for s in (0.3, 0.1, 0.05)
    ]
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    schedule = optim.make_schedule("cosine", 1e-2, total_steps=4, warmup_steps=0)
    tx = optim.make_optimizer(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, grad_clip=1.0)

    # Ours.
    p, state = jax.tree.map(jnp.asarray, params), tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(jax.tree.map(jnp.asarray, g), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)

    # torch, on the same tensors by Hugging Face name.
    names = dict(formats.params_to_tensors(params, config))
    tp = {n: torch.tensor(np.array(w), requires_grad=True) for n, w in names.items()}
    decay = [t for n, t in tp.items() if "norm" not in n]
    no_decay = [t for n, t in tp.items() if "norm" in n]
    assert len(no_decay) == 2 * config.n_layers + 1 and len(decay) == len(tp) - len(no_decay)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=_cosine_lr(0),
        betas=(b1, b2),
        eps=eps,
    )
    norms = []
    for i, g in enumerate(grads):
        for n, w in formats.params_to_tensors(g, config):
            tp[n].grad = torch.tensor(np.array(w))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)))
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(i)
        opt.step()
    assert min(norms) > 1.5  # clipping was active on every step

    got = dict(formats.params_to_tensors(jax.tree.map(np.asarray, p), config))
    for n, t in tp.items():
        np.testing.assert_allclose(got[n], t.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=n)
    # And the norms moved without decay: a norm scale changed by Adam alone, not shrunk by
    # lr * wd * 1.0 on top (a 2-D norm leaf decayed by mistake would fail the loop above).
    assert not np.allclose(got["model.norm.weight"], names["model.norm.weight"])


def test_decay_mask_on_the_real_tree():
    config = get_config("tiny")
    mask = optim.decay_mask(_shapes(config))
    assert mask["layers"]["attention_norm"]["scale"] is False
    assert mask["layers"]["mlp_norm"]["scale"] is False
    assert mask["final_norm"]["scale"] is False
    for leaf in ("wq", "wk", "wv", "wo"):
        assert mask["layers"]["attention"][leaf] is True
    assert mask["embedding"] is True and mask["lm_head"] is True
