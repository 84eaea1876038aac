"""`llama3 eval`: argument parsing for the evaluation runner (see `runner.py`)."""

from __future__ import annotations

import argparse
import os
import sys

from llama_jax.data.builtin_models import BUILTIN_MODELS
from llama_jax.eval import results, runner
from llama_jax.eval import tasks as builtin
from llama_jax.formats import is_run_dir
from llama_jax.inference.loaded import LoadedModel


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama3 eval",
        description="Evaluate a model on built-in offline tasks (--list) or lm-eval tasks.",
    )
    p.add_argument(
        "--model_path",
        help="llama_jax / Hugging Face / Meta / run directory, a GGUF file or a built-in name",
    )
    p.add_argument("--tasks", help="comma-separated task names")
    p.add_argument("--list", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--include_path", default=None, help="directory of lm-eval YAML tasks")
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most N items per task")
    p.add_argument("--output", default=None, help="results JSON (lm-eval's layout)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch_size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=1234, help="which few-shot examples")
    p.add_argument(
        "--chat",
        action="store_true",
        help="instruct models: prompts in the model's chat format, few-shot examples as turns "
        "(lm-eval tasks: apply_chat_template + fewshot_as_multiturn)",
    )
    p.add_argument(
        "--chat_template",
        default=None,
        metavar="FILE",
        help="with --chat: a jinja2 chat template used instead of the model's own",
    )
    p.add_argument("--cache_dir", default=None, help="where task archives are kept")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)

    if args.list:
        print(builtin.describe())
        return 0
    if not args.model_path or not args.tasks:
        p.error("--model_path and --tasks are required (or --list)")

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if args.num_fewshot < 0:
            raise ValueError(f"--num_fewshot={args.num_fewshot}; valid: an int >= 0")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit={args.limit}; valid: an int >= 1")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size={args.batch_size}; valid: an int >= 1")
        if not os.path.exists(args.model_path) and args.model_path not in BUILTIN_MODELS:
            raise ValueError(
                f"--model_path {args.model_path!r} is not a model directory, a GGUF file or a "
                f"built-in model name ({', '.join(BUILTIN_MODELS)})"
            )
        if args.include_path and not os.path.isdir(args.include_path):
            raise ValueError(f"--include_path {args.include_path!r} is not a directory")
        # before loading the model
        runner.check_tasks(names, args.include_path, lambda m: print(m, file=sys.stderr))
        model = LoadedModel.from_pretrained(
            args.model_path, dtype=args.dtype, chat_template=args.chat_template
        )
        metrics, truncated = runner.evaluate(
            model,
            names,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            seed=args.seed,
            chat=args.chat,
            batch_size=args.batch_size,
            cache=args.cache_dir,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(results.format_table(metrics))
    for task, n in truncated.items():
        if n:
            print(f"note: {task}: {n} prompt(s) truncated on the left to fit the window")
    config = {
        "model": "llama_jax",
        "model_args": f"pretrained={args.model_path},dtype={args.dtype}",
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "chat": args.chat,
        "truncated": truncated,
    }
    # The results are on screen; what follows writes them. A failure here is one line, and the
    # other write is still attempted.
    code = 0
    if args.output:
        try:
            results.write_json(args.output, metrics, config)
            print(f"wrote {args.output}")
        except OSError as e:
            code = _write_failed(f"cannot write --output {args.output}", e)
    if is_run_dir(args.model_path):
        if args.limit is not None:  # a part of each task is not the run's evaluation
            print(
                f"not logged to {args.model_path}/metrics.jsonl: --limit={args.limit} evaluates "
                "part of each task (run without --limit to log a full evaluation)"
            )
        else:
            try:
                step = results.log_to_run_dir(args.model_path, metrics)
                print(f"logged to {args.model_path}/metrics.jsonl and TensorBoard at step {step}")
            except OSError as e:
                code = _write_failed(f"cannot log to {args.model_path}/metrics.jsonl", e)
    return code


def _write_failed(what: str, e: OSError) -> int:
    why = e.strerror or str(e)
    print(
        f"error: {what} ({why}); the results above are complete: rerun with --output "
        "on a writable path to keep them",
        file=sys.stderr,
    )
    return 1
