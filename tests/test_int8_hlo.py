"""The int8 decode path reads its weights as int8: the compiled decode step (and the generation
loop) on CPU writes no float buffer of a weight's size, i.e. XLA does not convert a weight to a
bf16/f32 copy before the product. The detector is shown to find such copies where XLA:CPU does
make them (the standard layout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.inference import sampler as sampling
from llama_jax.inference.decode_layout import float_buffers
from llama_jax.model import sharding
from llama_jax.model.config import get_config
from llama_jax.model.transformer import init_params


@pytest.fixture(scope="module")
def model():
    config = get_config(
        "tiny", dim=128, mlp_dim=512, n_heads=4, n_kv_heads=2, max_seq_len=64, dtype="bfloat16"
    )
    params = jax.jit(lambda k: nn.unbox(init_params(config, k)))(jax.random.key(0))
    return config, params, sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def _step_hlo(sampler):
    """The compiled decode step, and the smallest int8 weight's element count."""
    _, cache = sampler.prefill(np.ones((1, 8), np.int32), np.array([8]), 32)
    with sampler.context():
        compiled = sampler._decode_jit.lower(
            sampler.params, cache, sampler.put(np.ones(1, np.int32)), sampler.put(np.array([8]))
        ).compile()
    smallest = min(a.size for a in jax.tree.leaves(sampler.params) if a.dtype == jnp.int8)
    return compiled, smallest


def test_int8_decode_reads_int8_weights_in_place(model):
    sampler = sampling.Sampler(*model, quantize="int8")  # CPU default: the matvec layout
    compiled, smallest = _step_hlo(sampler)
    assert float_buffers(compiled.as_text(), smallest) == []
    # No temporary could hold even the smallest weight in float32.
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * smallest
    # The loop users run (decode steps in a while loop): nothing hoisted out of it either.
    gen = sampling.Generation(sampler, [[1, 2, 3]], 4)
    with sampler.context():
        loop = sampler._run_jit.lower(
            sampler.params,
            gen._state,
            jnp.int32(4),
            sampler.put(np.zeros(1, bool)),
            *gen._args,
            **gen._static,
            chunk=2,
        ).compile()
    assert float_buffers(loop.as_text(), smallest) == []


def test_the_check_finds_dequantised_copies(model):
    # XLA:CPU converts each weight to float32 before a dot in the standard layout: the check
    # sees one copy per projection (7 per layer) and the untied head.
    config = model[0]
    sampler = sampling.Sampler(*model, quantize="int8", layout="standard")
    compiled, smallest = _step_hlo(sampler)
    copies = float_buffers(compiled.as_text(), smallest)
    assert len(copies) == 7 * config.n_layers + 1, copies
    assert all(c.split(": ")[1].startswith("f32[") for c in copies), copies
