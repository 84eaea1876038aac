"""Decode chunking (`Sampler.decode_chunk`, k steps per loop iteration) changes no token: every
k gives the tokens of k = 1, stop ids cut each row where it first produced one (mid-chunk
too), budgets need not be multiples of k, and seeded draws repeat. The compiled loop makes k
decode steps per iteration (read from the optimised HLO)."""

from __future__ import annotations

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama3
from llama_jax.inference import sampler as sampling
from llama_jax.inference.sampling_params import SamplingParams
from llama_jax.model.config import get_config
from llama_jax.model.transformer import init_params

CHUNKS = (1, 2, 3, 8)
BUDGET = 13  # a multiple of no chunk but 1
PROMPTS = [np.random.RandomState(0).randint(3, 256, n).tolist() for n in (4, 9, 2, 6)]


@pytest.fixture(scope="module")
def sampler():
    config = get_config("tiny", n_heads=4, n_kv_heads=2, max_seq_len=128)
    params = jax.jit(lambda k: nn.unbox(init_params(config, k)))(jax.random.key(0))
    return Llama3(config=config, params=params, dtype="float32").sampler(decode_chunk=1)


def _cut(rows, stops):
    """Each row up to (without) its first stop id: the stop rule, applied independently."""
    out = []
    for r in rows:
        i = next((i for i, t in enumerate(r) if t in stops), len(r))
        out.append(r[:i])
    return out


def _run(sampler, k, *args, **kwargs):
    sampler.decode_chunk = k
    try:
        return sampler.generate_ids(PROMPTS, *args, **kwargs)
    finally:
        sampler.decode_chunk = 1


def test_greedy_tokens_and_stops_are_the_same_for_every_chunk(sampler):
    full = _run(sampler, 1, BUDGET)
    assert all(len(r) == BUDGET for r in full)
    # Stop ids met first at steps 1, 4 and 6 of different rows: inside a chunk for k = 3, 8.
    stops = {full[1][1], full[0][4], full[3][6]}
    want = _cut(full, stops)
    assert len({len(r) for r in want}) > 2, want  # rows end at different steps
    for k in CHUNKS:
        assert _run(sampler, k, BUDGET) == full, k
        assert _run(sampler, k, BUDGET, stop_ids=stops) == want, k
    # A stop in every row: the loop ends early and the tokens stay the same.
    every = {r[2] for r in full}
    for k in CHUNKS:
        assert _run(sampler, k, BUDGET, stop_ids=every) == _cut(full, every), k


def test_seeded_sampling_and_host_stops_are_the_same_for_every_chunk(sampler):
    sp = SamplingParams(temperature=1.0)
    ref = _run(sampler, 1, BUDGET, sp, seed=5)
    stops = {ref[2][3]}
    ref_stopped = _cut(ref, stops)
    for k in CHUNKS:
        assert _run(sampler, k, BUDGET, sp, seed=5) == ref, k
        assert _run(sampler, k, BUDGET, sp, seed=5, stop_ids=stops) == ref_stopped, k
        # Advanced by 5 steps at a time (not a multiple of k), row 1 stopped from the host
        # after the first call: its tokens end there, the others are unchanged.
        sampler.decode_chunk = k
        gen = sampling.Generation(sampler, PROMPTS, BUDGET, sp, seed=5)
        gen.advance(5)
        gen.stop([1])
        while not gen.done:
            gen.advance(5)
        sampler.decode_chunk = 1
        assert gen.tokens[1] == ref[1][:6], k
        assert [gen.tokens[r] for r in (0, 2, 3)] == [ref[r] for r in (0, 2, 3)], k
    assert sampler.trace_counts["run"] == 2 * len(CHUNKS)  # one loop per (k, greedy) only


def _compiled_run(sampler, k):
    gen = sampling.Generation(sampler, PROMPTS, BUDGET)
    with sampler.context():
        return sampler._run_jit.lower(
            sampler.params,
            gen._state,
            jnp.int32(BUDGET),
            sampler.put(np.zeros(len(PROMPTS), bool)),
            *gen._args,
            **gen._static,
            chunk=k,
        ).compile()


def test_compiled_loop_makes_k_steps_per_iteration(sampler):
    k = 3
    compiled = _compiled_run(sampler, k)
    hlo = compiled.as_text()
    # Two loops: the outer one (tokens until every row stopped or the budget is spent: a trip
    # count XLA cannot know) and, in its body, the scan over k decode steps (known: k).
    whiles = re.findall(r"^\s*\S+ = .*\bwhile\(", hlo, re.M)
    trips = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', hlo)]
    assert len(whiles) == 2 and trips == [k], (len(whiles), trips)
    # ... holding the one decode step (as many dots as k = 1's loop, whose body is the step):
    # k steps per iteration of the outer loop.
    one = _compiled_run(sampler, 1).as_text()
    assert len(re.findall(r"^\s*\S+ = .*\bwhile\(", one, re.M)) == 1
    assert len(re.findall(r" dot\(", hlo)) == len(re.findall(r" dot\(", one)) > 0
    # The cache is updated in place: no cache-sized temporary (the donated state is aliased to
    # the output, and the loop carries it without a copy).
    cache_bytes = sum(
        a.nbytes for a in jax.tree.leaves(sampling.Generation(sampler, PROMPTS, 2)._state["cache"])
    )
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < cache_bytes, (mem.temp_size_in_bytes, cache_bytes)
    assert mem.alias_size_in_bytes >= cache_bytes, (mem.alias_size_in_bytes, cache_bytes)


def _serve(engine, jobs):
    """Runs (prompt, budget, sampling, stop ids, logprobs) jobs through a started `engine`, all
    submitted at once; returns each one's tokens and end reason."""
    import threading

    from llama_jax.serve.engine import Finished, Request, Token

    got, ends = [[] for _ in jobs], [None] * len(jobs)
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(e):
            if isinstance(e, Token):
                got[i].append(e.id)
            elif isinstance(e, Finished):
                ends[i] = e.reason
                done.release()

        return on_event

    for i, (p, m, s, stops, lp) in enumerate(jobs):
        engine.submit(Request(p, m, s, seed=9, stop_ids=stops, logprobs=lp), listener(i))
    for _ in jobs:
        assert done.acquire(timeout=300)
    return got, ends


def test_serve_engine_with_chunks_equals_offline_generation(sampler):
    """The engine at decode_chunk 3: each request (own budget, own stop ids, greedy or
    sampled, logprobs on one) gets the tokens and end reason of offline generation."""
    from llama_jax.serve.engine import Engine

    full = _run(sampler, 1, BUDGET)
    sp = SamplingParams(temperature=1.0)
    # (prompt, budget, sampling, stop ids, logprobs): stops met at different steps of
    # different chunks.
    jobs = [
        (PROMPTS[0], 13, SamplingParams(), frozenset({full[0][4]}), 2),
        (PROMPTS[1], 7, SamplingParams(), frozenset({full[1][1]}), None),
        (PROMPTS[2], 10, sp, frozenset(), None),
        (PROMPTS[3], 5, SamplingParams(), frozenset(), None),
    ]
    engine = Engine(sampler, max_batch=4, max_seq_len=32, decode_chunk=3)
    engine.start()
    try:
        got, ends = _serve(engine, jobs)
    finally:
        engine.close()
    for i, (p, m, s, stops, _) in enumerate(jobs):
        want = sampler.generate_ids([p], m, s, seed=9, stop_ids=stops)[0]
        assert got[i] == want, i
        assert ends[i] == ("length" if len(want) == m else "stop"), i
    assert ends[0] == ends[1] == "stop"  # mid-chunk stops were met


@pytest.mark.parametrize("call_s, k", [(float("inf"), 8), (0.0, 1)], ids=["cheap", "dear"])
def test_one_slot_steps_lone_chunk_a_call_when_its_step_is_cheap(sampler, monkeypatch, call_s, k):
    """Warm-up times the one-slot step: a lone choice's calls make as many steps as fit in
    LONE_CALL_S (here all LONE_CHUNK, or none but decode_chunk's 1), on the cache prefix its
    request can reach; the other sizes keep decode_chunk 1 and the whole cache. Tokens and
    ends are offline generation's either way."""
    from llama_jax.serve import slots
    from llama_jax.serve.engine import Engine

    assert slots.LONE_CHUNK == 8
    monkeypatch.setattr(slots, "LONE_CALL_S", call_s)
    assert slots.SPANS[:2] == (64, 128)
    engine = Engine(sampler, max_batch=4, max_seq_len=128)  # sizes 1, 2, 4
    engine.slots.warmup([])  # each size's step (the engine's warmup adds every prefill)
    assert engine.slots.chunks == {1: k, 2: 1, 4: 1}
    assert engine.slots.spans == ({1: (64,)} if k > 1 else {})
    full = _run(sampler, 1, BUDGET)
    engine.start()
    try:
        # Alone: the admit gives the first token, then 12 steps in calls of k (the last call's
        # steps past the budget are masked).
        got, ends = _serve(engine, [(PROMPTS[0], BUDGET, SamplingParams(), frozenset(), None)])
        assert got[0] == full[0] and ends == ["length"]
        assert engine.steps_by_size == {1: -(-12 // k)}
        # 4 + 13 positions: a 64-position prefix of the 128 when the calls are lone-chunk ones.
        assert engine.slots.calls_by_span == {64 if k > 1 else 128: -(-12 // k)}
        # Two at once (2 slots, one step a call), the second alone after the first ends and
        # stopping inside a call of k.
        jobs = [
            (PROMPTS[1], 3, SamplingParams(), frozenset(), None),
            (PROMPTS[3], BUDGET, SamplingParams(), frozenset({full[3][6]}), None),
        ]
        got, ends = _serve(engine, jobs)
        assert got == [full[1][:3], _cut([full[3]], {full[3][6]})[0]]
        assert ends == ["length", "stop"]
        # A long request alone reads the whole cache: 100 prompt + 20 new positions > 64.
        long_prompt = np.random.RandomState(1).randint(3, 256, 100).tolist()
        want = sampler.generate_ids([long_prompt], 20, SamplingParams())[0]
        before = collections.Counter(engine.slots.calls_by_span)
        got, ends = _serve(engine, [(long_prompt, 20, SamplingParams(), frozenset(), None)])
        assert got == [want] and ends == ["length"]
        assert set(engine.slots.calls_by_span - before) == {128}
    finally:
        engine.close()
