"""Running tasks: built-in ones directly, others through lm-eval; the results in three forms.

`Evaluator` holds one model as params + config + mesh + tokenizer (a `Llama3`'s, or the
trainer's live params) and runs built-in tasks on its `Scorer` and `Sampler`. `evaluate`
adds lm-eval tasks (through `harness.LlamaJaxLM`) for a `Llama3`. Results are `Metric`s:
eval/results.py prints them (task, metric, value, stderr, n), writes lm-eval's results layout,
and appends them to a run directory's metrics.jsonl and TensorBoard at the evaluated step.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from llama_jax.eval import tasks as builtin
from llama_jax.eval.choice import ChoiceItem, evaluate_choice
from llama_jax.eval.fewshot import choose_examples, fewshot_prompt
from llama_jax.eval.generation import generate_until, qa_metrics, translation_metrics
from llama_jax.eval.perplexity import evaluate_perplexity
from llama_jax.eval.requests import Metric
from llama_jax.inference.sampler import Sampler
from llama_jax.inference.scoring import Scorer

log = logging.getLogger("llama_jax.eval")

LM_EVAL_EXTRA = "pip install llama_jax[eval]"


class _Bar:
    """A tqdm bar over a task's requests (or nothing when progress is off)."""

    def __init__(self, enabled: bool, desc: str):
        self._enabled, self._desc, self._bar = enabled, desc, None

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=self._desc, unit="req", file=sys.stderr, dynamic_ncols=True
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Evaluator:
    """Built-in tasks on one model.

    Attributes:
      config, params, mesh, tokenizer: the model.
      truncated: per task, prompts / requests cut on the left to fit the window.
    """

    def __init__(
        self,
        config: Any,
        params: Any,
        mesh: Any,
        tokenizer: Any,
        *,
        scorer: Any = None,
        sampler: Any = None,
        batch_size: int = 32,
    ):
        self.config, self.params, self.mesh, self.tokenizer = config, params, mesh, tokenizer
        self._scorer, self._sampler, self.batch_size = scorer, sampler, batch_size
        self.truncated: dict[str, int] = {}

    @classmethod
    def from_llama(cls, model: Any, batch_size: int = 32) -> Evaluator:
        return cls(
            model.config,
            model.params,
            model.mesh,
            model.tokenizer,
            scorer=model.scorer(max_batch_size=batch_size),
            sampler=model.sampler(),
            batch_size=batch_size,
        )

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            self._scorer = Scorer(
                self.config, self.params, self.mesh, max_batch_size=self.batch_size
            )
        return self._scorer

    @property
    def sampler(self) -> Any:
        if self._sampler is None:
            self._sampler = Sampler(self.config, self.params, self.mesh)
        return self._sampler

    def run_task(
        self,
        name: str,
        num_fewshot: int = 0,
        limit: int | None = None,
        seed: int = 1234,
        chat: bool = False,
        cache: str | None = None,
        progress: bool = True,
    ) -> list[Metric]:
        """Runs one built-in task; returns its metrics."""
        task = builtin.get_task(name)
        data = task.load(cache)
        bar = _Bar(progress, name)
        try:
            return self._run(task, data, num_fewshot, limit, seed, chat, bar)
        finally:
            bar.close()

    def _run(self, task, data, k, limit, seed, chat, bar) -> list[Metric]:
        if task.kind == "perplexity":
            if chat:
                raise ValueError(f"task {task.name!r} is perplexity: --chat does not apply")
            if k:  # as lm-eval's rolling-loglikelihood tasks: scored zero-shot, said so
                log.warning(
                    "task %s is perplexity: scored zero-shot (num_fewshot=%d ignored)", task.name, k
                )
            docs = data.documents[:limit]
            before = self.scorer.truncated
            metrics, _ = evaluate_perplexity(
                self.scorer, self.tokenizer, docs, task.name, progress=bar
            )
            self.truncated[task.name] = self.scorer.truncated - before
            return metrics
        try:
            shots = choose_examples(data.fewshot, k, seed) if k else []
        except ValueError as e:
            raise ValueError(f"task {task.name!r}: {e}") from None
        if task.kind == "choice":
            items = data.items[:limit]
            if chat:
                raise ValueError(f"task {task.name!r} is multiple choice: chat does not apply")
            items = [
                ChoiceItem(fewshot_prompt(shots, it.context), it.choices, it.gold) for it in items
            ]
            before = self.scorer.truncated
            metrics, _ = evaluate_choice(
                self.scorer, self.tokenizer, items, task.name, macro_f1=task.macro_f1, progress=bar
            )
            self.truncated[task.name] = self.scorer.truncated - before
            return metrics
        prompts = [fewshot_prompt(shots, p, self.tokenizer, chat) for p in data.prompts[:limit]]
        refs = data.references[:limit]
        # A small model's window must still hold the prompt: at most half of it for the answer.
        max_new = min(task.max_new_tokens, self.config.max_seq_len // 2)
        texts, cut = generate_until(
            self.sampler,
            self.tokenizer,
            prompts,
            max_new,
            task.stop,
            batch_size=self.batch_size,
            progress=bar,
        )
        self.truncated[task.name] = cut
        if task.metrics == "qa":
            return qa_metrics(texts, refs, task.name)
        return translation_metrics(texts, [r[0] for r in refs], task.name)


# ----------------------------------------------------------------------------- lm-eval
def check_tasks(
    names: Sequence[str],
    include_path: str | None = None,
    announce: Callable[[str], Any] | None = None,
) -> tuple[list, list]:
    """Splits task names into (built-in, lm-eval); raises ValueError for an unknown name (with
    the closest valid one) or when lm-eval tasks are asked for without lm-eval installed.

    A name close to a built-in or --include_path task is taken as a typo at once; any other
    name is looked up in lm-eval's own index, which takes lm-eval a minute to build
    (`announce` is told first).
    """
    if not names:
        raise ValueError(f"no tasks given; built-in tasks: {', '.join(builtin.TASKS)}")
    ours = [n for n in names if n in builtin.TASKS]
    others = [n for n in names if n not in builtin.TASKS]
    if not others:
        return ours, others
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(
            f"task(s) {', '.join(others)} are not built in (built-in: "
            f"{', '.join(builtin.TASKS)}){_did_you_mean(others, builtin.TASKS)}; lm-eval "
            f"tasks need lm-evaluation-harness: {LM_EVAL_EXTRA}"
        ) from None
    local = _local_index(include_path)
    for n in others:
        if n in local:
            check_yaml_task(n, local[n])
    unknown = [n for n in others if n not in local]
    valid = (
        f"valid: the built-in tasks ({', '.join(builtin.TASKS)}), lm-eval's tasks (lm-eval ls "
        f"tasks) or YAML tasks in --include_path{f' ({include_path})' if include_path else ''}"
    )
    near = [*builtin.TASKS, *local]
    if any(difflib.get_close_matches(n, near, 1, TYPO_CUTOFF) for n in unknown):
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}{_did_you_mean(unknown, near)}; {valid}"
        )
    if unknown:  # indexing lm-eval's thousands of task files takes a while: only if needed
        if announce is not None:
            announce(f"looking up {', '.join(unknown)} among lm-eval's tasks (takes a minute)")
        known = TaskManager(include_path=include_path).all_tasks
        unknown = [n for n in others if n not in set(known)]
        if unknown:
            nameless = _files_without_task(include_path)
            raise ValueError(
                f"unknown task(s) {', '.join(unknown)}{_did_you_mean(unknown, known)}; {valid}"
                + (f"; {nameless[0]} names no task (no `task:` field)" if nameless else "")
            )
    return ours, others


TYPO_CUTOFF = 0.85  # difflib ratio: one or two letters off a name of 10


def _did_you_mean(names: Sequence[str], valid: Sequence[str]) -> str:
    hints = [
        f"{n!r} -> {m[0]!r}" for n in names if (m := difflib.get_close_matches(n, valid, 1, 0.75))
    ]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _local_index(include_path: str | None) -> dict[str, Any]:
    """lm-eval's index entries of the tasks in `include_path` alone, by name."""
    if not include_path:
        return {}
    _check_yaml_parses(include_path)
    from lm_eval.tasks import TaskManager

    return dict(TaskManager(include_path=include_path, include_defaults=False).task_index)


def _check_yaml_parses(include_path: str) -> None:
    """lm-eval skips a YAML file it cannot parse without a word, so its task would be reported
    as unknown: name the file and the place instead."""
    for root, _, files in os.walk(include_path):
        for f in sorted(files):
            if not f.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(root, f)
            try:
                with open(path, encoding="utf-8") as fh:
                    yaml.load(fh, Loader=_AnyTagLoader)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"task file {path} is not UTF-8 ({e.reason} at byte {e.start})"
                ) from None
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ValueError(
                    f"task file {path} is not valid YAML ({problem}{at}); fix it (lm-eval "
                    "would skip it and call its task unknown)"
                ) from None


def _local_tasks(include_path: str | None) -> set[str]:
    return set(_local_index(include_path))


OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
_FILE_DATASETS = ("json", "csv", "text", "parquet", "arrow")


def check_yaml_task(name: str, entry: Any) -> None:
    """Raises ValueError naming the YAML file and the first field it lacks (lm-eval itself
    fails later, after loading the model, with a bare TypeError or a traceback)."""
    path, cfg = getattr(entry, "yaml_path", None), getattr(entry, "cfg", None)
    if path is None or not isinstance(cfg, dict) or "class" in cfg or "task" not in cfg:
        return  # a Python task, a group or a tag: lm-eval checks those itself
    where = f"task {name!r} ({path})"
    kind = cfg.get("output_type", "generate_until")
    if kind not in OUTPUT_TYPES:
        raise ValueError(f"{where}: output_type {kind!r}; valid: {', '.join(OUTPUT_TYPES)}")
    needed = ["doc_to_text", "doc_to_target"] + (["doc_to_choice"] * (kind == "multiple_choice"))
    if "custom_dataset" not in cfg:
        needed.insert(0, "dataset_path")
    for field in needed:
        if cfg.get(field) is None:
            raise ValueError(f"{where} is missing `{field}:`; an lm-eval task needs {_NEEDS}")
    if not cfg.get("test_split") and not cfg.get("validation_split"):
        raise ValueError(
            f"{where} is missing `test_split:` (or `validation_split:`), the split it evaluates"
        )
    if cfg.get("dataset_path") in _FILE_DATASETS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        files = files.values() if isinstance(files, dict) else [files]
        for f in (x for v in files for x in (v if isinstance(v, list) else [v])):
            if isinstance(f, str) and not any(c in f for c in "*?[") and not os.path.exists(f):
                raise ValueError(f"{where}: data file {f} does not exist")
            if isinstance(f, str) and os.path.isfile(f) and cfg["dataset_path"] == "json":
                _check_jsonl(f, where)


def _check_jsonl(path: str, where: str) -> None:
    """Names the file and line of a byte that is not UTF-8 or a line that is not JSON (the
    datasets library reports neither)."""
    with open(path, "rb") as fh:
        head = fh.read(1)
        fh.seek(0)
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: data file {path} line {i}: byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1} is not UTF-8; save the file as UTF-8"
                ) from None
            if head == b"[" or not line.strip():  # a JSON array file: one document, not lines
                continue
            try:
                json.loads(line)
            except ValueError as e:
                raise ValueError(
                    f"{where}: data file {path} line {i} is not JSON ({e}); JSON Lines need "
                    "one object per line"
                ) from None


_NEEDS = (
    "dataset_path (e.g. json, with dataset_kwargs.data_files), test_split or validation_split, "
    "doc_to_text, doc_to_target, and doc_to_choice for output_type multiple_choice"
)


def _files_without_task(include_path: str | None) -> list[str]:
    """YAML files of `include_path` that define neither a task nor a group (a typo'd or
    missing `task:` key), which lm-eval skips without a word."""
    if not include_path:
        return []
    out = []
    for root, _, files in os.walk(include_path):
        for f in sorted(files):
            if not f.endswith((".yaml", ".yml")):
                continue
            try:
                with open(os.path.join(root, f)) as fh:
                    cfg = yaml.load(fh, Loader=_AnyTagLoader)
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(cfg, dict) and not {"task", "group", "tag"} & set(cfg):
                out.append(os.path.join(root, f))
    return out


class _AnyTagLoader(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's `!function` tags as plain values."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def run_lm_eval(
    model: Any,
    names: Sequence[str],
    include_path: str | None,
    num_fewshot: int,
    limit: int | None,
    batch_size: int,
    chat: bool = False,
    seed: int = 1234,
    **lm_eval_kwargs: Any,
) -> tuple[list[Metric], dict]:
    """lm-eval tasks on a `Llama3` through the llama_jax backend; returns our metrics and
    lm-eval's own output. `chat` renders prompts in the model's chat format, few-shot examples
    as turns (lm-eval's apply_chat_template + fewshot_as_multiturn); `seed` picks the
    few-shot examples (lm-eval's fewshot_random_seed); other keywords go to simple_evaluate."""
    # deferred: lm-eval is an extra (and the harness module needs it)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama_jax.eval.harness import LlamaJaxLM

    lm = LlamaJaxLM(model=model, batch_size=batch_size)
    local = set(names) <= _local_tasks(include_path)
    manager = TaskManager(include_path=include_path, include_defaults=not local)
    try:
        with _quiet_git_hash():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(names),
                task_manager=manager,
                num_fewshot=num_fewshot or None,
                limit=limit,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                fewshot_random_seed=seed,
                **lm_eval_kwargs,
            )
    except Exception as e:  # datasets raises its own ConnectionError / FileNotFoundError types
        if "offline" in str(e).lower() or "connect" in str(e).lower() or "hub" in str(e).lower():
            raise ValueError(
                f"lm-eval could not load the data of {', '.join(names)}: it lives on the "
                f"Hugging Face Hub, which this machine cannot reach ({type(e).__name__}: {e}). "
                "Use a YAML task with local data (--include_path) or a built-in task."
            ) from e
        raise
    metrics = []
    for task, values in out["results"].items():
        n = int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            stderr = values.get(f"{name}_stderr,{filt}")
            metrics.append(
                Metric(
                    task,
                    name if filt == "none" else key,
                    float(value),
                    float(stderr) if isinstance(stderr, (int, float)) else None,
                    n,
                )
            )
    return metrics, out


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records `git describe` of the working directory and lets git print "fatal: not
    a git repository" outside one; the same value, without that line on the terminal."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash

    def quiet() -> str | None:
        try:
            out = subprocess.run(
                ["git", "describe", "--always"], capture_output=True, text=True, check=True
            )
            return out.stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            from lm_eval.loggers.utils import get_commit_from_path

            return get_commit_from_path(os.getcwd())  # lm-eval's own fallback (reads .git)

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


# ----------------------------------------------------------------------------- results


def evaluate(
    model: Any,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = 1234,
    chat: bool = False,
    batch_size: int = 32,
    cache: str | None = None,
    progress: bool = True,
) -> tuple[list[Metric], dict[str, int]]:
    """Runs built-in and lm-eval tasks on a `Llama3`; returns the metrics and, per task, how
    many prompts were truncated to fit the window (built-in tasks)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}; valid: an int >= 1 (or None for every item)")
    ours, others = check_tasks(tasks, include_path)
    ev = Evaluator.from_llama(model, batch_size=batch_size)
    metrics: list[Metric] = []
    for name in tasks:
        if name in ours:
            metrics += ev.run_task(name, num_fewshot, limit, seed, chat, cache, progress)
    if others:
        metrics += run_lm_eval(
            model, others, include_path, num_fewshot, limit, batch_size, chat, seed
        )[0]
    return metrics, ev.truncated


# ----------------------------------------------------------------------------- trainer
def task_names(value: Any) -> list[str]:
    """The trainer's `eval_tasks` (a comma-separated string or a list) as checked names."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        builtin.get_task(n)  # ValueError listing the valid names
    return names


class TrainerEval:
    """The trainer's `eval_tasks` hook: built-in tasks on the live params at eval time.

    One `Scorer` is kept across evaluations (its compiled programs are reused; only the params
    change); generation tasks make a fresh `Sampler` for the new params.
    """

    @staticmethod
    def check_names(names: str | Sequence[str]) -> list[str]:
        """The task names of `eval_tasks`; ValueError naming the valid ones if one is unknown."""
        return task_names(names)

    def __init__(
        self,
        names: str | Sequence[str],
        config: Any,
        mesh: Any,
        tokenizer: Any,
        limit: int = 0,
        batch_size: int = 16,
        cache: str | None = None,
    ):
        self.names, self.limit, self.cache = task_names(names), limit or None, cache
        self._ev = Evaluator(config, None, mesh, tokenizer, batch_size=batch_size)

    def __call__(self, params: Any) -> dict[str, float]:
        """{"eval/<task>/<metric>": value} for the given params."""
        ev = self._ev
        ev.params = params
        if ev._scorer is not None:
            ev._scorer.params = params
        ev._sampler = None
        out = {}
        for name in self.names:
            for m in ev.run_task(name, limit=self.limit, cache=self.cache, progress=False):
                out[f"eval/{m.task}/{m.name}"] = m.value
        return out
