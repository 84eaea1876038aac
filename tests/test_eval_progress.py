"""The evaluation progress bar starts before the work: its first report is (0, total), so
the time and rate it shows count the compile and the first batch (it used to appear only
after the first batch, at 100% and a rate of thousands of requests per second)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from llama_jax.eval.choice import ChoiceItem, evaluate_choice
from llama_jax.eval.generation import generate_until
from llama_jax.eval.perplexity import evaluate_perplexity
from llama_jax.inference.loaded import LoadedModel
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import init_params
from llama_jax.tokenizer import train_tokenizer


def test_progress_starts_at_zero_and_ends_at_total(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("kartonemsuvpi"), 4)) for _ in range(100)]
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
    tok = train_tokenizer(str(tmp_path / "c.txt"), 300, tmp_path / "sp", show_progress=False)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
        max_seq_len=64,
    )  # fmt: skip
    params = jax.tree.map(np.asarray, nn.unbox(init_params(cfg, jax.random.key(0))))
    model = LoadedModel(config=cfg, params=params, tokenizer=tok, dtype="float32")
    seen = []
    generate_until(
        model.sampler(), tok, ["a", "b", "c"], 2, batch_size=2, progress=lambda *a: seen.append(a)
    )
    assert seen == [(0, 3), (2, 3), (3, 3)]
    seen.clear()
    evaluate_perplexity(model.scorer(), tok, ["one two three"], progress=lambda *a: seen.append(a))
    assert seen[0] == (0, 1) and seen[-1] == (1, 1)
    seen.clear()
    items = [ChoiceItem("Is it?", [" yes", " no"], 0)]
    evaluate_choice(model.scorer(), tok, items, "t", progress=lambda *a: seen.append(a))
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
