"""SmolLM2-135M-Instruct on the real weights (#21): a LoRA `llama3 finetune` on chatterbot/en in
its ChatML template (runs, resumes, its masked loss equals transformers'), and `llama3 eval
--chat` against lm-eval's own `hf` backend with `apply_chat_template`.

The model is the built-in name's GGUF; transformers' side is the Hugging Face directory its
GGUF loading makes (tests/smollm2.py, cached on disk for all workers and runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import smollm2 as smol  # noqa: E402
from test_train import assert_trees_equal, final_state, losses  # noqa: E402

from llama_jax import cli  # noqa: E402

STEPS, STOP_AT = 2, 1
SEQ_LEN, BATCH = 64, 2
DIALOGS = 48  # of chatterbot/en's train split, as a chat JSONL (rendering all ~1,900 per run
# costs seconds; no validation set: the end-of-run evaluation would be one more compile)


def _finetune_args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--init_from", smol.NAME, "--data_path", str(data),
        "--model_path", str(run), "--lora_rank", "4", "--num_gpus", "1",
        f"--config.seq_len={SEQ_LEN}", f"--config.batch_size={BATCH}",
        f"--config.num_steps={STEPS}", "--config.warmup_steps=1",
        "--config.learning_rate=1e-3", "--config.lora.dropout=0.1",
        "--config.model.dtype=float32", "--config.model.param_dtype=float32",
        "--config.base_dtype=float32", "--config.log_every=1", "--config.checkpoint_every=1",
        "--config.progress=false", "--config.tensorboard=false", "--config.peak_flops=1e11",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dialogs(tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    """The first DIALOGS dialogs of chatterbot/en (train split) as a chat JSONL."""
    from llama_jax.data import chat

    rows = chat.read_dialogs("chatterbot/en", "train")[:DIALOGS]
    path = tmp_path_factory.mktemp("chatterbot") / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path, rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dialogs):
    """An uninterrupted LoRA run, and one stopped after STOP_AT steps and resumed."""
    data, _ = dialogs
    root = tmp_path_factory.mktemp("smol_ft")
    whole, resumed = root / "whole", root / "resumed"
    assert cli.main(_finetune_args(data, whole)) == 0
    assert cli.main(_finetune_args(data, resumed, f"--config.debug_stop_after={STOP_AT}")) == 0
    assert sorted(losses(str(resumed))) == list(range(1, STOP_AT + 1))
    assert final_state(str(resumed))[0] == STOP_AT
    assert cli.main(_finetune_args(data, resumed)) == 0
    return whole, resumed


def test_lora_finetune_resumes_like_an_uninterrupted_run(runs):
    whole, resumed = runs
    assert sorted(losses(str(whole))) == list(range(1, STEPS + 1))
    assert losses(str(resumed)) == losses(str(whole))
    step, state = final_state(str(resumed))
    assert step == STEPS
    assert_trees_equal(state, final_state(str(whole))[1])
    # The adapters moved (B starts at zero): the run trained something.
    b = [np.asarray(x) for p, x in _leaves(state["params"]) if p.endswith("/b")]
    assert len(b) == 7 and all(np.abs(x).max() > 0 for x in b)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, tree


def _segments(batch) -> list[list[int]]:
    """The dialogs packed into a batch, as ids (inputs of each segment + its last target)."""
    out = []
    inputs, targets, segs = (np.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids"))
    for row in range(inputs.shape[0]):
        for s in sorted(set(segs[row].tolist()) - {0}):
            sel = segs[row] == s
            out.append(inputs[row][sel].tolist() + [int(targets[row][sel][-1])])
    return out


def _hf_labels(messages: list[dict], ids: list[int]) -> list[int]:
    """transformers' labels for `ids` (a dialog's ids, maybe cut on the right): each assistant
    turn's tokens up to and including its <|im_end|>, from transformers' own renderings of the
    dialog and of its prefixes; -100 elsewhere."""
    full = smol.hf_chat_ids(messages)
    assert full[: len(ids)] == ids  # our ids are transformers' (cut at seq_len + 1)
    im_end = smol.hf_tokenizer().convert_tokens_to_ids("<|im_end|>")
    labels = [-100] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(smol.hf_chat_ids(messages[:k], add_generation_prompt=True))
        end = full.index(im_end, start) + 1
        labels[start:end] = full[start:end]
    return labels[: len(ids)]


def test_masked_loss_equals_transformers_labels_minus_100(runs, dialogs):
    """The first logged loss (the base's: LoRA's B starts at zero) equals transformers' loss
    of the same first batch with labels = -100 outside the assistant tokens."""
    from llama_jax.data.chat import make_chat_iterators
    from llama_jax.model import sharding
    from llama_jax.tokenizer import load_tokenizer

    whole, _ = runs
    data, rows = dialogs
    first = losses(str(whole))[1]
    tok = load_tokenizer(smol.gguf_file())
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    # The trainer's first batch, as `make_data` builds it for this run's config.
    train_it, eval_it, _ = make_chat_iterators(
        str(data), tok, seq_len=SEQ_LEN, global_batch_size=BATCH, mesh=mesh, seed=0
    )
    try:
        segments = _segments(next(train_it))
    finally:
        for it in (train_it, eval_it):
            getattr(it, "close", lambda: None)()
    # Which dialog each segment is, from transformers' rendering of every one.
    hf_tok = smol.hf_tokenizer()
    rendered = [(hf_tok.apply_chat_template(d, tokenize=False), d) for d in rows]
    labels = []
    for ids in segments:
        text = hf_tok.decode(ids)
        messages = next(d for r, d in rendered if r.startswith(text))
        labels.append(_hf_labels(messages, ids))
    assert len(segments) >= BATCH and all(any(x != -100 for x in y) for y in labels)

    def compute() -> float:
        t = max(map(len, segments))
        pad = lambda rows, v: torch.tensor([r + [v] * (t - len(r)) for r in rows])  # noqa: E731
        att = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in segments])
        with torch.no_grad():
            out = smol.hf_model()(input_ids=pad(segments, 0), attention_mask=att,
                                  labels=pad(labels, -100))  # fmt: skip
        return float(out.loss)

    ref = smol.cached("masked_loss", [segments, labels], compute)
    assert abs(first - ref) <= 1e-4 * max(1.0, abs(ref)), (first, ref)


# ----------------------------------------------------------------------------- eval --chat
MC_DOCS = [
    {"question": "What colour is a clear daytime sky?", "choices": ["Blue", "Green", "Red"],
     "label": 0},
    {"question": "What is 2 + 2?", "choices": ["4", "5", "22"], "label": 0},
    {"question": "What is the capital of France?", "choices": ["Rome", "Paris", "Berlin"],
     "label": 1},
    {"question": "Which animal says meow?", "choices": ["A dog", "A cow", "A cat"], "label": 2},
]  # fmt: skip
# Multiple choice only: a generate_until task would compile the 30-layer decode step once more
# (~30 s); lm-eval's chat generation is compared on a tiny model in test_eval_harness.py.
TASKS = ["smol_mc"]
FEWSHOT = 1


def _task_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mc.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in MC_DOCS)
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: smol_mc\n" + head.format(root / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )  # fmt: skip
    return root


def _digest(out: dict) -> dict:
    """What the comparison needs of simple_evaluate's output, as JSON."""
    samples = {
        t: [
            {"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"]}
            for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])
        ]
        for t in TASKS
    }
    keep = {t: {k: v for k, v in out["results"][t].items() if "," in k} for t in TASKS}
    return json.loads(json.dumps({"results": keep, "samples": samples}, default=float))


@pytest.fixture(scope="module")
def hf_eval(tmp_path_factory):
    """lm-eval's hf backend on the Hugging Face directory, chat template applied (cached: the
    tasks are this file's constants)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    tasks = _task_dir(tmp_path_factory.mktemp("smol_tasks"))

    def compute() -> dict:
        import lm_eval
        from lm_eval.tasks import TaskManager

        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={smol.hf_dir()},dtype=float32",
            tasks=TASKS,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            batch_size=4,
            device="cpu",
            num_fewshot=FEWSHOT,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            fewshot_random_seed=1234,
            log_samples=True,
        )
        return _digest(out)

    return smol.cached("lm_eval_hf", [MC_DOCS, FEWSHOT], compute), tasks


def test_llama3_eval_chat_equals_lm_eval_hf(hf_eval, tmp_path, capsys):
    want, tasks = hf_eval
    # A path that is neither a file, a directory nor a built-in name: one line, nothing loaded.
    assert cli.main(["eval", "--model_path", "no-such-model", "--tasks", "smol_mc"]) == 1
    assert capsys.readouterr().err == (
        "error: --model_path 'no-such-model' does not exist (valid: a model or run directory, "
        f"a GGUF file, or a built-in model name: {smol.NAME})\n"
    )
    out = tmp_path / "results.json"
    argv = ["eval", "--model_path", smol.NAME, "--tasks", ",".join(TASKS), "--chat"]
    argv += ["--include_path", str(tasks), "--num_fewshot", str(FEWSHOT), "--batch_size", "4"]
    assert cli.main(argv + ["--output", str(out), "--no_progress"]) == 0, capsys.readouterr().err
    got = json.loads(out.read_text())["results"]
    print(capsys.readouterr().out)
    for metric in ("acc,none", "acc_norm,none"):
        assert got["smol_mc"][metric] == want["results"]["smol_mc"][metric], metric


def test_eval_chat_requests_equal_lm_eval_hf(hf_eval):
    """Request by request (what `llama3 eval --chat` runs, on the shared model): the rendered
    chat prompts (a 1-shot dialog) are identical, log-likelihoods within float32 noise."""
    from llama_jax.eval.runner import run_lm_eval

    want, tasks = hf_eval
    _, out = run_lm_eval(smol.ours(), TASKS, str(tasks), FEWSHOT, None, 4, chat=True,
                         log_samples=True)  # fmt: skip
    got = _digest(out)
    mc_hf, mc_ours = want["samples"]["smol_mc"], got["samples"]["smol_mc"]
    context = mc_hf[0]["arguments"][0][0]
    assert context.startswith("<|im_start|>system\n") and context.count("<|im_start|>user") == 2
    assert context.endswith("<|im_start|>assistant\n")
    assert len(mc_hf) == len(mc_ours) == len(MC_DOCS)
    for a, b in zip(mc_hf, mc_ours):
        assert a["arguments"] == b["arguments"]
        for ra, rb in zip(a["resps"], b["resps"]):
            assert abs(ra[0][0] - rb[0][0]) <= 1e-3 and ra[0][1] == rb[0][1], (ra, rb)
