"""SmolLM2-135M-Instruct: llama_jax's built-in task scores next to lm-eval's `hf` backend.

One run, the same weights on both sides: the built-in `smollm2-135m-instruct` GGUF (Q4_1)
for llama_jax, loaded as `llama3 eval --model_path smollm2-135m-instruct` loads it; for
lm-eval, the float32 Hugging Face directory transformers' own GGUF loader makes of the same
file (tests/smollm2.py: `hf_dir`, cached on disk and shared with the tests).

1. llama_jax: every built-in task through `Evaluator.run_task`, the code `llama3 eval
   --tasks ...` runs (plain prompts; and with `--chat` for the generation tasks, the
   multiple-choice and perplexity tasks refuse chat). The requests, generations and
   log-likelihoods are recorded by wrapping the runner's measurement functions (no other
   change to the path).
2. lm-eval: each task written as a local YAML task (temporary directory) over the same
   documents (the first `--limit` test items), the same few-shot examples (the ones the
   built-in run drew, as the task's few-shot split, `sampler: first_n`: lm-eval's default
   sampler would draw new examples per document), the same prompt and delimiters, run by
   `lm_eval.simple_evaluate(model="hf", ...)` (with `apply_chat_template` +
   `fewshot_as_multiturn` for chat).
3. One table: task, mode, metric, llama_jax, lm-eval hf, difference, n; then, per task, how
   many requests were identical (prompt text), generations equal, and the largest
   log-likelihood difference.

Metrics on lm-eval's side: its own acc / acc_norm / acc_bytes, word / byte perplexity,
bits_per_byte, BLEU (13a) and chrF; where it has no equal, written here from their
definitions (not llama_jax's code): SQuAD exact match / token F1 (process_results in the
task's utils.py), BLEU with sacrebleu's `zh` tokenizer for Chinese targets (an aggregation),
macro F1 (sklearn, over lm-eval's logged per-document log-likelihoods). Token perplexity
depends on the tokenizer and lm-eval does not report it: shown as n/a.

Perplexity: both sides score with a window of `--ppl_window` tokens (llama_jax: the scorer's
window; lm-eval: `max_length`), since 8,192-token windows cost minutes per document on a CPU;
and only the first `--ppl_docs` documents (The Comedy of Errors), cut to their first
`--ppl_chars` characters (the same text on both sides; 0 keeps them whole, ~25k tokens).

  nice -n 19 python bench/bench_builtin_lmeval.py                   # ~10-15 min on 2 CPUs
  nice -n 19 python bench/bench_builtin_lmeval.py --tasks sentiment_zh --limit 8
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # this checkout; tests/smollm2.py

MODES = ("plain", "chat")


# ----------------------------------------------------------------------------- llama_jax side
class Recorder:
    """Wraps the runner's measurement functions to keep what they were given and returned."""

    def __init__(self) -> None:
        from llama_jax.eval import runner

        self.runner, self.calls = runner, []
        self._orig = {
            n: getattr(runner, n)
            for n in ("evaluate_choice", "generate_until", "evaluate_perplexity")
        }

        def wrap(name):
            def wrapped(*args, **kwargs):
                out = self._orig[name](*args, **kwargs)
                self.calls.append((name, args, kwargs, out))
                return out

            return wrapped

        for n in self._orig:
            setattr(runner, n, wrap(n))
        # The token ids the engines were given: prompts (generation), requests (scoring).
        from llama_jax.eval import generation

        self.generation, self.prompt_ids, self.requests = generation, [], []
        self._generate_text = generation.generate_text

        def generate_text(sampler, tokenizer, prompts, *a, **kw):
            self.prompt_ids += [list(p) for p in prompts]
            return self._generate_text(sampler, tokenizer, prompts, *a, **kw)

        generation.generate_text = generate_text

    def watch(self, scorer: Any) -> None:
        """Records the requests `scorer.loglikelihood` is given."""
        orig = type(scorer).loglikelihood

        def loglikelihood(requests, *a, **kw):
            self.requests += [(list(c), list(t)) for c, t in requests]
            return orig(scorer, requests, *a, **kw)

        scorer.loglikelihood = loglikelihood

    def restore(self) -> None:
        for n, f in self._orig.items():
            setattr(self.runner, n, f)
        self.generation.generate_text = self._generate_text


def run_ours(model: Any, names: list[str], args: Any) -> dict[tuple[str, str], dict]:
    """{(task, mode): {"metrics": {name: value}, "n": n, "record": what the runner saw}}."""
    from llama_jax.eval import runner
    from llama_jax.eval import tasks as builtin

    ev = runner.Evaluator.from_llama(model, batch_size=args.batch_size)
    ev.scorer.window = args.ppl_window  # as lm-eval's max_length on the other side
    rec = Recorder()
    rec.watch(ev.scorer)
    out = {}
    try:
        for name in names:
            task = builtin.get_task(name)
            for mode in modes_of(task, args):
                limit = args.ppl_docs if task.kind == "perplexity" else args.limit
                k = 0 if task.kind == "perplexity" else args.num_fewshot
                t0 = time.time()
                rec.prompt_ids, rec.requests = [], []
                metrics = ev.run_task(
                    name, k, limit, args.seed, mode == "chat", progress=not args.no_progress
                )
                call = rec.calls[-1]
                out[(name, mode)] = {
                    "metrics": {m.name: m.value for m in metrics},
                    "n": metrics[0].n,
                    "record": call,
                    "prompt_ids": rec.prompt_ids,
                    "requests": rec.requests,
                    "seconds": time.time() - t0,
                }
                print(f"llama_jax {name} [{mode}]: {time.time() - t0:.0f} s", file=sys.stderr)
    finally:
        rec.restore()
    return out


def modes_of(task: Any, args: Any) -> list[str]:
    if task.kind != "generate":  # the runner refuses chat for choice and perplexity tasks
        return ["plain"]
    return [m for m in MODES if m in args.modes]


# ----------------------------------------------------------------------------- lm-eval side
UTILS = '''
"""Metrics of the built-in tasks, written from their definitions (not llama_jax's code)."""
import collections
import dataclasses
import re
import string

import sacrebleu


def _norm(s):  # SQuAD v1.1's normalize_answer
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\\b(a|an|the)\\b", " ", s)
    return " ".join(s.split())


def _f1(pred, gold):
    p, g = _norm(pred).split(), _norm(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_results(doc, results):
    pred, gold = results[0], doc["target"]
    return {"exact_match": float(_norm(pred) == _norm(gold)), "f1": _f1(pred, gold)}


def bleu_zh(items):
    refs, preds = zip(*items)
    return sacrebleu.corpus_bleu([p.strip() for p in preds], [[r.strip() for r in refs]],
                                 tokenize="zh").score
'''


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a YAML string


def write_lm_eval_tasks(root: str, names: list[str], ours: dict, args: Any) -> dict[str, str]:
    """One YAML task per built-in task over the documents the built-in run used; returns
    {built-in name: lm-eval task name}."""
    from llama_jax.eval import tasks as builtin
    from llama_jax.eval.fewshot import choose_examples
    from llama_jax.eval.generation import is_chinese

    with open(os.path.join(root, "utils.py"), "w") as f:
        f.write(UTILS)
    out = {}
    for name in names:
        task = builtin.get_task(name)
        data = task.load(None)
        lm_name = f"lmeval_{name}"
        out[name] = lm_name
        k = 0 if task.kind == "perplexity" else args.num_fewshot
        shots = choose_examples(data.fewshot, k, args.seed) if k else []
        if task.kind == "choice":
            items = data.items[: args.limit]
            choices = list(items[0].choices)
            test = [{"text": it.context, "choices": list(it.choices), "gold": it.gold}
                    for it in items]  # fmt: skip
            few = [{"text": p, "choices": choices, "gold": choices.index(a)} for p, a in shots]
            body = (
                "output_type: multiple_choice\ndoc_to_text: text\ndoc_to_choice: choices\n"
                'doc_to_target: gold\ntarget_delimiter: ""\n'
                "metric_list:\n"
                + "".join(
                    f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                    for m in ("acc", "acc_norm", "acc_bytes")
                )
            )
        elif task.kind == "generate":
            refs = data.references[: args.limit]
            test = [{"text": p, "target": r[0]} for p, r in zip(data.prompts[: args.limit], refs)]
            few = [{"text": p, "target": a.strip()} for p, a in shots]
            for _, a in shots:  # the built-in shot is "prompt answer": one space, then it
                assert a == " " + a.strip(), (name, a)
            gen = {
                "until": list(task.stop),
                "max_gen_toks": min(task.max_new_tokens, 8192 // 2),
                "do_sample": False,
            }
            body = (
                "output_type: generate_until\ndoc_to_text: text\ndoc_to_target: target\n"
                'target_delimiter: " "\n'
                f"generation_kwargs: {json.dumps(gen)}\n"
            )
            if task.metrics == "qa":
                body += "process_results: !function utils.qa_results\nmetric_list:\n" + "".join(
                    f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                    for m in ("exact_match", "f1")
                )
            elif is_chinese([r[0] for r in refs]):
                body += (
                    "metric_list:\n  - metric: bleu\n    aggregation: !function utils.bleu_zh\n"
                    "    higher_is_better: true\n  - metric: chrf\n    aggregation: chrf\n"
                    "    higher_is_better: true\n"
                )
            else:
                body += (
                    "metric_list:\n  - metric: bleu\n    aggregation: bleu\n"
                    "    higher_is_better: true\n  - metric: chrf\n    aggregation: chrf\n"
                    "    higher_is_better: true\n"
                )
        else:
            test = [{"text": d} for d in data.documents[: args.ppl_docs] if d]
            few = []
            body = (
                'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
                "metric_list:\n"
                + "".join(
                    f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n"
                    for m, a in (
                        ("word_perplexity", "weighted_perplexity"),
                        ("byte_perplexity", "weighted_perplexity"),
                        ("bits_per_byte", "bits_per_byte"),
                    )
                )
            )
        files = {"test": os.path.join(root, f"{name}.test.jsonl")}
        for split, docs in (("test", test), ("fewshot", few)):
            if not docs:
                continue
            files[split] = os.path.join(root, f"{name}.{split}.jsonl")
            with open(files[split], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        head = (
            f"task: {lm_name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            + "".join(f"    {s}: {p}\n" for s, p in files.items())
            + "test_split: test\n"
        )
        if few:
            head += "fewshot_split: fewshot\nfewshot_config:\n  sampler: first_n\n"
        with open(os.path.join(root, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(head + body)
    return out


def run_lm_eval(lm: Any, root: str, lm_names: dict, ours: dict, args: Any) -> dict:
    """{(task, mode): lm-eval's results and samples of that task}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=root, include_defaults=False)
    out = {}
    for mode in MODES:
        todo = [n for (n, m) in ours if m == mode]
        if not todo:
            continue
        for name in todo:  # one task a call: its time is its own
            t0 = time.time()
            k = 0 if ours[(name, mode)]["record"][0] == "evaluate_perplexity" else args.num_fewshot
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[lm_names[name]],
                task_manager=manager,
                num_fewshot=k or None,
                apply_chat_template=mode == "chat",
                fewshot_as_multiturn=mode == "chat",
                fewshot_random_seed=args.seed,
                log_samples=True,
            )
            t = lm_names[name]
            out[(name, mode)] = {
                "results": res["results"][t],
                "samples": sorted(res["samples"][t], key=lambda s: s["doc_id"]),
                "n": int(res["n-samples"][t]["effective"]),
                "seconds": time.time() - t0,
            }
            print(f"lm-eval hf {name} [{mode}]: {time.time() - t0:.0f} s", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- comparison
def compare(name: str, mode: str, ours: dict, theirs: dict, tok: Any) -> tuple[list, str]:
    """Table rows and one line on the requests of one task."""
    o, t = ours[(name, mode)], theirs[(name, mode)]
    kind, call_args, call_kwargs, result = o["record"]
    samples = t["samples"]
    rows, notes = [], []
    lm_vals = {k.split(",")[0]: v for k, v in t["results"].items() if k.endswith(",none")}
    if kind == "evaluate_choice":
        items = call_args[2]
        _, records = result
        # lm-eval's hf requests as ids: its _encode_pair with transformers' tokenizer
        want = []
        for s in samples:
            for ctx, cont in s["arguments"]:
                c, whole = ids(tok, ctx), ids(tok, ctx + cont)
                want.append((c, whole[len(c) :]))
        same = sum(a == b for a, b in zip(o["requests"], want))
        dll = max(
            abs(a - r[0][0])
            for rec, s in zip(records, samples)
            for a, r in zip(rec["loglikelihoods"], s["resps"])
        )
        preds = [int(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]))
                 for s in samples]  # fmt: skip
        golds = [it.gold for it in items]
        from sklearn.metrics import f1_score

        lm_vals["macro_f1"] = float(f1_score(golds, preds, average="macro"))
        agree = sum(r["pred"] == p for r, p in zip(records, preds))
        notes.append(
            f"identical token requests {same}/{len(want)}; max |dLL| {dll:.2e}; "
            f"same prediction {agree}/{len(items)}"
        )
        if same < len(want):
            a, b = next((a, b) for a, b in zip(o["requests"], want) if a != b)
            notes.append(f"first differing context: ours {a[0][:6]}... / hf {b[0][:6]}...")
        src = {"macro_f1": "lm-eval side: sklearn macro F1 of its per-doc predictions"}
    elif kind == "generate_until":
        texts, _ = result
        # lm-eval's hf prompts as ids (transformers' tokenizer on its context text); ours are
        # in the engine's order (by length): compared as multisets
        want = collections.Counter(tuple(ids(tok, s["arguments"][0][0])) for s in samples)
        got = collections.Counter(tuple(p) for p in o["prompt_ids"])
        same = sum((want & got).values())
        gens = [s["resps"][0][0] for s in samples]
        equal = sum(a.strip() == b.strip() for a, b in zip(texts, gens))
        n = len(samples)
        notes.append(f"identical token prompts {same}/{n}; equal generations {equal}/{n}")
        first = next(((a, b) for a, b in zip(texts, gens) if a.strip() != b.strip()), None)
        if first:
            notes.append(f"first differing: ours {first[0]!r} / hf {first[1]!r}")
        if same < n:
            a = min(got - want)
            b = min(want - got)
            notes.append(f"first differing prompt: ours {list(a[:6])}... / hf {list(b[:6])}...")
        src = {}
    else:
        _, per_doc = result
        lls = [s["resps"][0][0] for s in samples]
        lls = [x[0] if isinstance(x, (list, tuple)) else x for x in lls]
        docs = [d for d in call_args[2] if d]
        same = sum(d == s["arguments"][0][0] for d, s in zip(docs, samples))
        rel = max(abs(a - b) / abs(b) for a, b in zip(per_doc, lls))
        notes.append(
            f"identical documents {same}/{len(docs)}; doc log-likelihood ours "
            f"{sum(per_doc):.2f} vs hf {sum(lls):.2f} (max rel diff {rel:.1e})"
        )
        src = {"token_perplexity": "n/a: lm-eval does not report token perplexity"}
    for metric, value in o["metrics"].items():
        if metric in lm_vals:
            v = float(lm_vals[metric])
            rows.append((name, mode, metric, value, v, value - v, o["n"], src.get(metric, "")))
        else:
            rows.append((name, mode, metric, value, None, None, o["n"], src.get(metric, "n/a")))
    return rows, "; ".join(notes)


def ids(tok: Any, text: str) -> list[int]:
    """transformers' ids of `text` as lm-eval's hf backend encodes it (the tokenizer's own
    special tokens: none for SmolLM2)."""
    return tok(text)["input_ids"]


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (math.isnan(x) or abs(x) >= 1e4):
        return f"{x:.4g}"
    return f"{x:.4f}"


def main() -> None:
    from llama_jax.eval import tasks as builtin

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(builtin.TASKS), help="built-in task names")
    p.add_argument("--limit", type=int, default=8, help="items / prompts per task")
    p.add_argument("--num_fewshot", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234, help="which few-shot examples")
    p.add_argument("--modes", default="plain,chat", help="plain, chat or both (generation)")
    p.add_argument("--ppl_docs", type=int, default=1, help="perplexity documents")
    p.add_argument("--ppl_chars", type=int, default=6000, help="0: whole documents")
    p.add_argument("--ppl_window", type=int, default=2048, help="tokens per scoring window")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    for n in names:
        builtin.get_task(n)  # one line naming the valid ones
    args.modes = [m.strip() for m in args.modes.split(",")]
    if not set(args.modes) <= set(MODES) or args.limit < 1:
        p.error(f"--modes {args.modes} (valid: {', '.join(MODES)}) / --limit {args.limit}")

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = tempfile.mkdtemp(prefix="bench_builtin_lmeval-")
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tmp, "hf_datasets"))
    start = time.time()

    import smollm2 as smol
    import transformers
    from lm_eval.models.huggingface import HFLM

    from llama_jax.inference.loaded import LoadedModel

    if args.ppl_chars:  # the same shorter documents for both sides
        task = builtin.TASKS["shakespeare"]
        load = task.load

        def short(cache=None):
            data = load(cache)
            data.documents = [d[: args.ppl_chars] for d in data.documents]
            return data

        builtin.TASKS["shakespeare"] = dataclasses.replace(task, load=short)

    gguf = smol.gguf_file()
    hf_dir = str(smol.hf_dir())
    model = LoadedModel.from_pretrained(gguf, dtype="float32")  # as `llama3 eval` loads it
    lm = HFLM(
        pretrained=hf_dir,
        dtype="float32",
        device="cpu",
        batch_size=args.batch_size,
        max_length=args.ppl_window,
    )
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    root = os.path.join(tmp, "tasks")
    os.makedirs(root)
    print(
        f"SmolLM2-135M-Instruct, float32; limit {args.limit}, {args.num_fewshot}-shot "
        f"(seed {args.seed}), perplexity: {args.ppl_docs} doc(s)"
        + (f", first {args.ppl_chars} characters" if args.ppl_chars else "")
        + f", {args.ppl_window}-token windows\n"
    )
    print("| task | mode | metric | llama_jax | lm-eval hf | difference | n | note |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows, notes = [], []
    for name in names:  # both sides, task by task: each row printed when it is known
        ours = run_ours(model, [name], args)
        lm_names = write_lm_eval_tasks(root, [name], ours, args)
        theirs = run_lm_eval(lm, root, lm_names, ours, args)
        for key in ours:
            r, note = compare(*key, ours, theirs, tok)
            rows += r
            for _, mode, metric, a, b, d, n, src in r:
                print(
                    f"| {name} | {mode} | {metric} | {fmt(a)} | {fmt(b)} | {fmt(d)} | {n} | {src} |"
                )
            secs = f"{ours[key]['seconds']:.0f} s / {theirs[key]['seconds']:.0f} s"
            notes.append(f"- {key[0]} [{key[1]}] (time ours / hf {secs}): {note}")
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "notes": notes, "args": vars(args)}, f, indent=1)
    print()
    print("\n".join(notes))
    print(f"\n{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
