"""int8 weight-only quantisation: a numpy reference, and quality on a briefly trained tiny model.

Stated tolerances (float32 compute, trained tiny model below): logits within 5% of the logits'
standard deviation, held-out perplexity within 1% of the unquantised model, and at least 90% of
greedy tokens equal.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.api import Llama3
from llama_jax.inference import sampler as sampling
from llama_jax.model import quantize as Q
from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import Transformer, init_params

VOCAB = 64


def _markov(rng: np.random.RandomState, n: int, length: int) -> np.ndarray:
    """Sequences from a fixed order-1 Markov chain with peaked transitions (learnable)."""
    table = np.random.RandomState(123).dirichlet(np.full(VOCAB, 0.1), VOCAB)
    out = np.zeros((n, length), np.int32)
    out[:, 0] = rng.randint(0, VOCAB, n)
    for t in range(1, length):
        u = rng.rand(n, 1)
        out[:, t] = (np.cumsum(table[out[:, t - 1]], 1) < u).sum(1).clip(0, VOCAB - 1)
    return out


def _train(**kw):
    """A 2-layer d=64 model trained for 150 Adam steps on the Markov chain (float32)."""
    config = ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128, max_seq_len=64,
        **kw,
    )  # fmt: skip
    model = Transformer(config)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss(p, x):
        logits, _ = model.apply({"params": p}, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(p, o, x):
        value, g = jax.value_and_grad(loss)(p, x)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, value

    rng = np.random.RandomState(0)
    for _ in range(150):
        params, opt, value = step(params, opt, _markov(rng, 16, 33))
    held_out = _markov(np.random.RandomState(99), 32, 33)
    return config, params, held_out, float(value)


@pytest.fixture(scope="module")
def trained():
    return _train()


@pytest.fixture(scope="module")
def trained_tied():
    return _train(tie_embeddings=True)


def decode_logprob(sampler, rows):
    """Teacher-forced log-likelihood of equal-length rows through the decode path (the int8
    layouts and the tied head's copy live there): prefill the first token, then one decode
    step per token, summing log p(next token)."""
    tokens = np.asarray(rows, np.int32)
    b, t = tokens.shape
    logits, cache = sampler.prefill(tokens[:, :1], np.ones(b, np.int32), cache_len=t)
    total = np.zeros(b)
    for i in range(1, t):
        logp = jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1)
        total += np.asarray(logp)[np.arange(b), tokens[:, i]]
        if i < t - 1:
            logits, cache = sampler.decode_step(cache, tokens[:, i], np.full(b, i))
    return total


def test_quantize_matches_a_numpy_per_channel_reference():
    w = np.random.RandomState(0).randn(2, 16, 4, 8).astype(np.float32)  # [L, D, N, H]
    got = Q.quantize_params({"attention": {"wq": w}})["attention"]["wq"]
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0  # per (layer, head, feature)
    q = np.clip(np.round(w / scale), -127, 127)
    np.testing.assert_array_equal(np.asarray(got["q"]), q.astype(np.int8))
    np.testing.assert_allclose(np.asarray(got["scale"]), scale, rtol=1e-6)
    back = Q.dequantize({"wq": got})["wq"]
    assert np.abs(np.asarray(back) - w).max() <= scale.max() / 2 + 1e-6
    with pytest.raises(ValueError, match="quantize='int4'; valid: 'int8' or None"):
        Q.check_quantize("int4")


def _nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
    return float(-jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], -1).mean())


def test_int8_logits_perplexity_and_greedy_tokens(trained):
    config, params, held_out, train_loss = trained
    assert train_loss < np.log(VOCAB) - 1.0  # it learnt the chain (uniform would be 4.16)
    full = Llama3(config=config, params=params, dtype="float32")
    int8 = Llama3(config=config, params=params, dtype="float32", quantize="int8")
    ref = full.logits(held_out[:, :-1])
    got = int8.logits(held_out[:, :-1])
    assert np.abs(got - ref).max() < 0.05 * ref.std()
    ppl_ref = np.exp(_nll(ref, held_out[:, 1:]))
    ppl_int8 = np.exp(_nll(got, held_out[:, 1:]))
    assert abs(ppl_int8 / ppl_ref - 1) < 0.01, (ppl_ref, ppl_int8)

    prompts = [list(map(int, row[:6])) for row in held_out[:8]]
    want = full.sampler().generate_ids(prompts, 16)
    sampler = int8.sampler()
    assert sampler.quantize == "int8"
    leaves = jax.tree.leaves(sampler.params, is_leaf=Q.is_quantized_leaf)
    qs = [x["q"] for x in leaves if Q.is_quantized_leaf(x)]
    assert len(qs) == 7 * config.n_layers + 1 and all(q.dtype == jnp.int8 for q in qs)
    have = sampler.generate_ids(prompts, 16)
    agree = np.mean([a == b for x, y in zip(want, have) for a, b in zip(x, y)])
    assert agree >= 0.9, agree


def test_int8_matvec_layout_equals_the_standard_one(trained):
    """On CPU "auto" stores int8 weights in the matvec layout (the conversion fuses into the
    matrix-vector products); it computes what the standard int8 layout does."""
    config, params, held_out, _ = trained
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    std = sampling.Sampler(config, params, mesh, layout="standard", quantize="int8")
    mv = sampling.Sampler(config, params, mesh, quantize="int8", dtype="float32")
    assert mv.layout == "matvec" and std.layout == "standard"
    q = mv.params["layers_0"]["attention"]["wq"]["q"]
    assert q.dtype == jnp.int8 and q.ndim == 3  # [C, M, Kc]
    rows = [list(map(int, r)) for r in held_out[:4, :20]]
    np.testing.assert_allclose(
        decode_logprob(mv, rows), decode_logprob(std, rows), rtol=1e-5, atol=1e-4
    )
    prompts = [r[:6] for r in rows]
    assert mv.generate_ids(prompts, 12) == std.generate_ids(prompts, 12)
    assert mv.generate_ids(prompts[:1], 12) == std.generate_ids(prompts[:1], 12)  # one row


@pytest.mark.parametrize("layout", ["standard", "matvec"])
def test_int8_tied_head_reads_an_int8_copy_of_the_table(trained_tied, layout):
    """A tied embedding stays as it is for the lookup; the head reads an int8 copy (one scale
    per vocabulary row). Held-out perplexity stays within 1%, greedy tokens agree >= 90%, and
    both int8 layouts compute the same."""
    config, params, held_out, train_loss = trained_tied
    assert config.tie_embeddings and train_loss < np.log(VOCAB) - 1.0
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    full = sampling.Sampler(config, params, mesh, layout="standard")
    int8 = sampling.Sampler(config, params, mesh, layout=layout, quantize="int8")
    head = int8.params[sampling.TIED_HEAD]
    assert head["q"].dtype == jnp.int8 and head["q"].size == config.vocab_size * config.dim
    assert int8.params["embedding"].dtype == jnp.float32  # the lookup's table, untouched
    rows = [list(map(int, r)) for r in held_out]
    n_tokens = len(rows) * (len(rows[0]) - 1)
    ppl_ref = np.exp(-np.sum(decode_logprob(full, rows)) / n_tokens)
    ppl_int8 = np.exp(-np.sum(decode_logprob(int8, rows)) / n_tokens)
    assert abs(ppl_int8 / ppl_ref - 1) < 0.01, (ppl_ref, ppl_int8)
    prompts = [r[:6] for r in rows[:8]]
    want, have = full.generate_ids(prompts, 16), int8.generate_ids(prompts, 16)
    agree = np.mean([a == b for x, y in zip(want, have) for a, b in zip(x, y)])
    assert agree >= 0.9, agree
    if layout == "matvec":
        std = sampling.Sampler(config, params, mesh, layout="standard", quantize="int8")
        np.testing.assert_allclose(
            decode_logprob(int8, rows[:4]), decode_logprob(std, rows[:4]), atol=1e-4
        )
        assert have == std.generate_ids(prompts, 16)


def test_bad_quantize_values(trained):
    config, params, _, _ = trained
    with pytest.raises(ValueError, match="quantize='fp4'"):
        Llama3(config=config, params=params, quantize="fp4")
