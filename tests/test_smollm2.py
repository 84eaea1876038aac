"""SmolLM2-135M-Instruct on the real weights: its GGUF read by llama_jax against transformers'
own GGUF loading (#20), and chat in its own ChatML template end to end (#21).

One `Llama3` (float32, from the GGUF) serves every test of this file; transformers' side (the
Hugging Face directory it makes of the GGUF, its greedy ids) is cached on disk by
tests/smollm2.py for all workers and runs. Fine-tuning and `llama3 eval --chat` on the same
weights are in test_smollm2_train_eval.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

import smollm2 as smol  # noqa: E402

from llama_jax import formats  # noqa: E402
from llama_jax.data.builtin_models import resolve_model_path  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402

# Raw-text prompts of 33-48 tokens, like the chat prompts below: every generation of this file
# is one batch-1 shape (one prompt bucket, one cache length), compiled once. (A 30-layer decode
# step, unrolled as the sampler lays it out on CPU, takes ~30 s to compile on 2 idle cores.)
PROMPTS = [
    "Paris is the largest city of its country, famous for its museums, its cafés and the tower "
    "that Gustave Eiffel built for the world fair of 1889. The capital of France is",
    'def fibonacci(n):\n    """The n-th Fibonacci number, computed iteratively in O(n) time."""'
    "\n    a, b = 0, 1\n    for _ in range(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woman "
    "and her three clever grandchildren. One cold and snowy winter morning,",
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# The three questions of the closing note, asked through `llama3 chat`.
QUESTIONS = [
    "What is the capital of France?",
    "What is 17 × 3?",
    "Write a one-line poem about the sea.",
]
# New tokens of every chat reply (one prefill / decode compile for them all): France's answer
# ends well before, at <|im_end|>; the poem may not.
NEW = 40


@pytest.fixture(scope="module")
def model():
    return smol.ours()


# ----------------------------------------------------------------------------- GGUF (#20)
def test_logits_and_greedy_match_transformers(model):
    tok = smol.hf_tokenizer()
    assert model.config.tie_embeddings and model.config.n_layers == 30
    batch = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    assert [model.tokenizer.encode(p) for p in PROMPTS] == batch
    # One forward of the right-padded batch (one compile): causal attention keeps padding on
    # the right out of every real position.
    width = max(map(len, batch))
    padded = np.array([ids + [0] * (width - len(ids)) for ids in batch])
    ours = model.logits(padded)
    for row, ids in zip(ours, batch):
        # Not 1e-4: the float32 floor. Weights and RoPE frequencies are bitwise transformers'
        # and the math is the same, but against a float64 forward transformers' float32 logits
        # are off by 4.5-5.8e-5 and ours by 0.6-1.0e-4 (up to ~40 on these prompts):
        # XLA:CPU's float32 dot sums its contraction in a longer chain than torch's BLAS (the
        # tied head alone: 3.8-6.4e-5 vs 3.1-4.0e-5), and SmolLM2's residual stream holds
        # values of ~23,000 (layers 12-28, an ulp of 2e-3). Seen up to 1.6e-4 apart.
        np.testing.assert_allclose(row[: len(ids)], smol.hf_logits(ids), atol=2.5e-4, rtol=0)
    stop = model.tokenizer.stop_ids
    assert stop == (2,)  # <|im_end|>, transformers' eos too
    for ids in batch:
        assert 33 <= len(ids) <= 48
        theirs = smol.hf_greedy(ids, NEW, stop=True)
        assert len(theirs) >= 32  # greedy text continues past the 32 tokens
        want = theirs[:-1] if theirs[-1] in stop else theirs
        assert model.generate_ids([ids], max_new_tokens=NEW)[0] == want


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    base = [
        "Hello world",
        " 123 4567 89 3.14159 1,000,000",
        "你好，世界！ 日本語のテキスト 한국어",
        "def f(x):\n    return x**2  # 平方\n\n\n",
        "   lots   of    spaces\t\ttabs\n \n",
        "<|im_start|>user\nhi<|im_end|>",
        "<|im_start|",
        "<|endoftext|> <repo_name>",
        "émoji 🎉🎉 naïve café Ωmega",
        "don't it's we'll I'M YOU'RE",
        "\r\n\r\n x",
        "a" * 300,
        "",
        " ",
        "ﬁ ligature, zero\u200bwidth, combining e\u0301",
        "-  1 - 2  -   3",
    ]
    alphabet = list("abcXYZ019 \n\t.,;'\"-_()[]{}<>|/\\") + ["é", "中", "🙂", "ß", "  ", "\u00a0"]
    for _ in range(300):
        k = int(rng.integers(1, 40))
        base.append("".join(rng.choice(alphabet, k)))
    return base


def test_tokenizer_matches_transformers(model):
    tok = smol.hf_tokenizer()
    ours = load_tokenizer(smol.gguf_file())
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.add_bos_token is False
    template = gguf.GGUFReader(smol.gguf_file()).fields["tokenizer.chat_template"].contents()
    assert ours.chat_template == tok.chat_template == template and "<|im_start|>" in template
    for text in _texts():
        plain = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ours.encode(text) == plain, text
        assert ours.encode(text, allowed_special="all") == tok.encode(
            text, add_special_tokens=False
        ), text
        assert ours.decode(plain) == text


def test_builtin_name_and_directory(model, tmp_path, monkeypatch):
    # The built-in name resolves to the cached file; a directory with one .gguf loads too.
    path = resolve_model_path(smol.NAME)
    assert os.path.samefile(path, smol.gguf_file())
    config = formats.read_config(path)
    assert config.n_layers == 30 and config.vocab_size == 49152
    d = tmp_path / "one"
    d.mkdir()
    os.symlink(path, d / os.path.basename(path))
    assert formats.read_config(str(d)) == config
    assert load_tokenizer(str(d)).vocab_size == 49152
    monkeypatch.chdir(tmp_path)  # a local path of that name wins
    os.mkdir(smol.NAME)
    assert resolve_model_path(smol.NAME) == smol.NAME


def test_convert_gguf_to_hf_dir_loads_in_transformers(tmp_path):
    out = tmp_path / "hf"
    formats.convert(smol.gguf_file(), str(out), "hf")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == smol.hf_tokenizer().chat_template
    assert tok.eos_token == "<|im_end|>"
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # SmolLM2's own special ids (not Llama 3's 128000 / 128001), so generation ends the turn.
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (1, 2, 2)
    assert 2 in np.atleast_1d(hf.generation_config.eos_token_id)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].numpy()
    # The same weights as transformers' own GGUF loading, bit for bit, so the same logits.
    np.testing.assert_array_equal(got, smol.hf_logits(ids))


# ----------------------------------------------------------------------------- chat (#21)
def test_the_template_is_the_ggufs_and_renders_like_transformers(model):
    tok = model.tokenizer
    assert tok.special_tokens["<|im_end|>"] in tok.stop_ids
    dialog = [
        {"role": "system", "content": "Answer in one word."},
        *FRANCE,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?"},
    ]
    for messages in (FRANCE, dialog):
        assert tok.encode_dialog(messages) == smol.hf_chat_ids(messages, add_generation_prompt=True)


def test_chat_answers_paris_stops_at_end_of_turn_and_equals_transformers(model):
    reply = model.chat(FRANCE, max_new_tokens=NEW)
    assert "Paris" in reply and "<|im_end|>" not in reply
    prompt = model.tokenizer.encode_dialog(FRANCE)
    ours = model.generate_ids([prompt], max_new_tokens=NEW)[0]
    theirs = smol.hf_greedy(prompt, NEW, stop=True)
    im_end = model.tokenizer.special_tokens["<|im_end|>"]
    assert theirs[-1] == im_end and len(theirs) < NEW  # transformers stopped at end of turn
    assert ours == theirs[:-1]
    assert model.tokenizer.decode(ours) == reply


def test_piped_chat_stops_at_each_end_of_turn(model):
    from llama_jax.inference.text_stream import run_chat

    out = io.StringIO()
    lines = ["What is the capital of France?\n", "/exit\n", "never read\n"]
    messages = run_chat(model, lines, out.write, max_new_tokens=NEW, temperature=0.0)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert "Paris" in messages[-1]["content"]
    assert out.getvalue() == messages[-1]["content"] + "\n"


def test_llama3_chat_command_with_piped_prompts(model):
    """`llama3 chat --model_path smollm2-135m-instruct`, prompts on stdin (a pipe): each reply
    ends at the end of turn, without `<|im_end|>`, and equals `Llama3.chat` (greedy)."""
    stdin = "\n/reset\n".join(QUESTIONS) + "\n"
    cmd = [sys.executable, "-m", "llama_jax.cli", "chat", "--model_path", smol.NAME]
    cmd += ["--dtype", "float32", "--temperature", "0", "--max_new_tokens", str(NEW)]
    # The test process's matmul precision, so the CLI reuses what this file compiled (the
    # persistent compilation cache of conftest.py).
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    replies = [model.chat([{"role": "user", "content": q}], max_new_tokens=NEW)
               for q in QUESTIONS]  # fmt: skip
    print("llama3 chat answered:", *(f"  {q} -> {r!r}" for q, r in zip(QUESTIONS, replies)),
          sep="\n")  # fmt: skip
    assert done.stdout == "\n[conversation reset]\n".join(replies) + "\n"
    assert "<|im_end|>" not in done.stdout and "Paris" in replies[0]
    # The France reply ended at <|im_end|> (transformers' too: the chat test above), well
    # before the length limit.
    assert len(model.tokenizer.encode(replies[0])) < NEW // 2


def test_openai_chat_completions_equal_llama3_chat(model):
    from llama_jax.serve.app import ServeApp
    from llama_jax.serve.engine import Engine
    from llama_jax.serve.server import ServerThread

    # No warm-up: compiling every bucket of a 30-layer model takes minutes on a CPU; the one
    # request compiles only what it needs.
    engine = Engine(model.sampler(), max_batch=1, max_seq_len=128, max_queue=4)
    engine.start()
    try:
        with ServerThread(ServeApp(engine, model.tokenizer, "smollm2", api_key=None)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            got = client.chat.completions.create(
                model="smollm2", messages=FRANCE, max_tokens=NEW, temperature=0
            )
            text = client.completions.create(
                model="smollm2", prompt=PROMPTS[0], max_tokens=8, temperature=0
            )
    finally:
        engine.close()
    # A plain prompt starts as transformers' tokenizer starts it: SmolLM2 adds no BOS (its id 1
    # is <|im_start|>), in /v1/completions as in Llama3.generate.
    assert text.usage.prompt_tokens == len(smol.hf_tokenizer().encode(PROMPTS[0]))
    assert text.choices[0].text == model.generate(PROMPTS[0], max_new_tokens=8)
    want = model.chat(FRANCE, max_new_tokens=NEW)
    assert got.choices[0].message.content == want
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.prompt_tokens == len(model.tokenizer.encode_dialog(FRANCE))
