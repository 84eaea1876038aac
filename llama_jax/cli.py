"""The `llama3` command: argument parsing only; each subcommand calls into the library.

A mistake of the user's (a bad flag value, a missing file, a refused checkpoint, a full disk)
ends in one line `error: ...` and exit code 1; `--debug` or `--verbose` (anywhere on the line)
or `LLAMA_JAX_DEBUG=1` adds the traceback and orbax's own error logs.

Run as the `llama3` process (`main()` without arguments), a failing command exits at once even
when a library left non-daemon threads behind (orbax's checkpoint threads wait forever for a
save that failed), so a job scheduler sees the exit status within seconds, not at walltime.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import pickle
import sys
import traceback

import jax

from llama_jax import __version__
from llama_jax.api import Llama3
from llama_jax.data.archive import DownloadError
from llama_jax.data.builtin_models import BUILTIN_MODELS, resolve_model_path
from llama_jax.eval.cli import main as eval_main
from llama_jax.eval.runner import TrainerEval
from llama_jax.formats import convert, finetune_run
from llama_jax.formats.checkpoint import CheckpointError
from llama_jax.inference.text_stream import run_chat
from llama_jax.tokenizer import cli_main
from llama_jax.training import experiment, finetune, plan
from llama_jax.training.trainer import NonFiniteLossError, train

MODEL_PATH_HELP = (
    "a model or run directory (llama_jax, Hugging Face, Meta), a GGUF file, or a built-in "
    f"model name ({', '.join(BUILTIN_MODELS)})"
)


def _convert(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama3 convert",
        description="Convert a Hugging Face, Meta or llama_jax model directory, or a GGUF file.",
    )
    p.add_argument(
        "--input",
        required=True,
        help=f"source: {MODEL_PATH_HELP}",
    )
    p.add_argument(
        "--output",
        required=True,
        help="destination directory (new or empty); with --format gguf, the .gguf file",
    )
    p.add_argument(
        "--format",
        default="llama_jax",
        choices=["llama_jax", "hf", "peft", "gguf"],
        help="peft: a LoRA run's adapters alone, for peft.PeftModel.from_pretrained",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast parameters (default: keep the checkpoint's dtype)",
    )
    p.add_argument(
        "--gguf_type",
        default=None,
        choices=["f32", "f16", "bf16", "q8_0"],
        help="--format gguf: type of the weight matrices (default f16; norms stay f32)",
    )
    args = p.parse_args(argv)
    config = convert(
        resolve_model_path(args.input, "--input"),
        args.output,
        args.format,
        args.dtype,
        args.gguf_type,
    )
    if args.format == "peft":
        record = finetune_run.read_record(args.input)
        print(
            f"wrote the PEFT adapter (rank {record['lora']['rank']}) of {args.input} to "
            f"{args.output}; its base is {record['base']['path']} (for transformers: "
            "llama3 convert --format hf of that base)"
        )
        return 0
    if args.format == "gguf":  # the matrices' type is the file's, not the source's dtype
        size = os.path.getsize(args.output) / 1e6
        print(
            f"wrote GGUF file {args.output} ({size:.1f} MB: {config.param_count() / 1e6:.1f}M "
            f"params, {args.gguf_type or 'f16'} matrices, f32 norms)"
        )
        return 0
    print(
        f"wrote {args.format} model ({config.param_count() / 1e6:.1f}M params, "
        f"{config.param_dtype}) to {args.output}"
    )
    return 0


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama3 train",
        description="Train from an experiment config; any key is set with --config.KEY=VALUE "
        "(--print_config lists them), the common ones also by the shortcuts below.",
    )
    _shortcut_flags(p)
    p.add_argument(
        "--config",
        default=None,
        help="experiments/NAME.py[:VARIANT]; default: a small model for your own --data_path "
        "(llama_jax.training.experiment.default_config)",
    )
    p.add_argument("--print_config", action="store_true", help="print the config and exit")
    args, rest = p.parse_known_args(argv)
    config = experiment.load_config(args.config) if args.config else experiment.default_config()
    unknown = experiment.parse_overrides(config, _shortcuts_given(args) + rest)
    if unknown:
        p.error(f"unrecognised arguments: {' '.join(unknown)}")
    if args.print_config:
        print(config)
        return 0
    if not config.data_path:
        raise ValueError(
            "no training data: give --data_path (text files, a directory or a glob; "
            "'shakespeare'; or tfds:NAME), or --config experiments/NAME.py"
        )
    result = train(config, task_eval=TrainerEval)
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    return 0


def _finetune(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama3 finetune",
        description="Fine-tune a base model (full, or LoRA with --lora_rank > 0); any key is "
        "set with --config.KEY=VALUE, the common ones also by the shortcuts below.",
    )
    _shortcut_flags(p)
    p.add_argument("--init_from", required=True, help=f"the base: {MODEL_PATH_HELP}")
    p.add_argument("--config", default="", help="experiments/NAME.py[:VARIANT] (default: LoRA SFT)")
    p.add_argument("--lora_rank", type=int, default=None, help="0: full fine-tune")
    p.add_argument("--print_config", action="store_true", help="print the config and exit")
    _chat_template_flag(p)
    args, rest = p.parse_known_args(argv)
    rest = _shortcuts_given(args) + rest
    config = experiment.load_config(args.config) if args.config else finetune.default_config()
    config.init_from = args.init_from
    if args.lora_rank is not None:
        config.lora.rank = args.lora_rank
    if args.chat_template is not None:
        config.chat_template = args.chat_template
    unknown = experiment.parse_overrides(config, rest)
    if unknown:
        p.error(f"unrecognised arguments: {' '.join(unknown)}")
    finetune.prepare(config)
    if args.print_config:
        print(config)
        return 0
    result = train(config, task_eval=TrainerEval)
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    return 0


def _shortcut_flags(p: argparse.ArgumentParser) -> None:
    """The experiment keys with a flag of their own (as the README uses them), in --help."""
    what = {
        "data_path": "training data: text files, a directory or glob, 'shakespeare', tfds:NAME",
        "valid_data_path": "validation data (default: hold out the last 5%%)",
        "model_path": "the run directory (checkpoints, metrics, the model)",
        "num_gpus": "devices to use (default: all)",
        "batch_size": "sequences per step (global)",
        "learning_rate": "peak learning rate",
        "num_epochs": "epochs over the data (replaces the config's num_steps)",
    }
    for flag, key in experiment.LEGACY_FLAGS.items():
        p.add_argument(
            f"--{flag}",
            default=argparse.SUPPRESS,
            metavar=flag.split("_")[-1].upper(),
            help=f"{what.get(flag, '')} (= --config.{key})",
        )


def _shortcuts_given(args: argparse.Namespace) -> list[str]:
    """The shortcut flags given, as overrides (the experiment checks their types)."""
    return [
        f"--{flag}={getattr(args, flag)}" for flag in experiment.LEGACY_FLAGS if hasattr(args, flag)
    ]


def _plan(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama3 plan",
        description="Compile an experiment's train and eval steps for a TPU or GPU topology on "
        "this host (no TPU, GPU, weights or data needed): per-chip memory vs HBM, FLOPs, "
        "roofline, MFU bound, collectives. Exit 0 fits, 2 does not fit, 1 error. "
        "Overrides: --config.KEY=VALUE.",
    )
    p.add_argument("--config", required=True, help="experiments/NAME.py[:VARIANT]")
    p.add_argument(
        "--topology",
        required=True,
        help="v4-8, v5e-16, v5p-64, v6e-256, v5e:4x4, ...; h100-8, a100-8, h200-8",
    )
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    args, rest = p.parse_known_args(argv)
    if not os.environ.get("JAX_PLATFORMS"):
        # The host compiles for the TPU / GPU devices libtpu / the CUDA plugin describe; JAX
        # itself runs on the CPU
        # (no search for a TPU to run on, even on a TPU VM).
        jax.config.update("jax_platforms", "cpu")
    plan.parse_topology(args.topology)  # a bad name fails before the config is loaded
    config = experiment.load_config(args.config)
    unknown = experiment.parse_overrides(config, rest)
    if unknown:
        p.error(f"unrecognised arguments: {' '.join(unknown)}")
    return plan.run(config, args.topology, args.json)


def _tokenizer(argv: list[str]) -> int:
    # A built-in model name is a tokenizer too (its GGUF file holds one); the tokenizer layer
    # below knows nothing of built-in names, so they are resolved here.
    argv = list(argv)
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag != "--tokenizer":
            continue
        if not eq and i + 1 < len(argv):
            value = argv[i + 1]
        if value in BUILTIN_MODELS and not os.path.exists(value):
            path = resolve_model_path(value, "--tokenizer")
            argv[i : i + (1 if eq else 2)] = [f"--tokenizer={path}"]
        break
    return cli_main(argv)


def _chat_template_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat_template",
        default=None,
        metavar="FILE",
        help="a jinja2 chat template (or tokenizer_config.json) used instead of the model's own "
        "(default: the model's template, else the built-in Llama 3 format)",
    )


def _sampling_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model_path", required=True, help=MODEL_PATH_HELP)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the checkpoint's own dtype",
    )
    p.add_argument(
        "--quantize", default="none", choices=["none", "int8"], help="int8 weight-only quantisation"
    )
    p.add_argument("--adapter", default=None, help="a PEFT LoRA directory or LoRA run to merge")
    p.add_argument("--max_new_tokens", type=int, default=256)
    # Meta's reference sampling settings; --temperature 0 is greedy.
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: no limit")
    p.add_argument("--top_p", type=float, default=0.9, help="1: no limit")
    p.add_argument("--min_p", type=float, default=0.0, help="0: no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="drop the oldest prompt tokens that do not fit the model's context",
    )
    return p


def _sampling_kwargs(args: argparse.Namespace, truncate: bool = True) -> dict:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop")
    return {name: getattr(args, name) for name in names + (("truncate",) if truncate else ())}


def _generate(argv: list[str]) -> int:
    p = _sampling_parser("llama3 generate", "Continue text prompts, streaming to stdout.")
    p.add_argument("prompt", nargs="+", help="prompt text (BOS is prepended)")
    args = p.parse_args(argv)
    model = Llama3.from_pretrained(
        args.model_path, dtype=args.dtype, quantize=args.quantize, adapter=args.adapter
    )
    for i, prompt in enumerate(args.prompt):
        # The prompt, then its continuation as it streams; a blank line between prompts.
        sys.stdout.write(("\n" if i else "") + prompt)
        for piece in model.stream(prompt, **_sampling_kwargs(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _chat(argv: list[str]) -> int:
    p = _sampling_parser(
        "llama3 chat",
        "Chat on stdin (one line per turn; /reset forgets, /exit quits). The system prompt is "
        "kept; the oldest whole turns are dropped when the conversation outgrows the context "
        "(--truncate: the new turn too loses its oldest tokens if it alone does not fit).",
    )
    p.add_argument("--system", default=None, help="system prompt")
    _chat_template_flag(p)
    args = p.parse_args(argv)
    model = Llama3.from_pretrained(
        args.model_path,
        dtype=args.dtype,
        quantize=args.quantize,
        adapter=args.adapter,
        chat_template=args.chat_template,
    )
    prompt = "> " if sys.stdin.isatty() else ""
    errors: list[str] = []
    run_chat(
        model, sys.stdin, sys.stdout.write, args.system, prompt, errors, **_sampling_kwargs(args)
    )
    if errors:
        print(
            f"error: {len(errors)} turn(s) failed; the first: {_one_line(ValueError(errors[0]))}",
            file=sys.stderr,
        )
        return 1
    return 0


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama3 serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health) with continuous batching.",
    )
    p.add_argument("--model_path", required=True, help=MODEL_PATH_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api_key",
        default=os.environ.get("LLAMA_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LLAMA_JAX_API_KEY; none: open)",
    )
    p.add_argument("--max_batch", type=int, default=16, help="concurrent sequences (slots)")
    p.add_argument(
        "--max_seq_len",
        type=int,
        default=None,
        help="prompt + new tokens per slot (default: the model's context, at most 4096)",
    )
    p.add_argument("--max_queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the checkpoint's own dtype",
    )
    p.add_argument("--mesh_shape", default=None, help="data,fsdp,tensor (e.g. 1,1,-1)")
    p.add_argument("--model_name", default=None, help="served model id (default: the dir name)")
    _chat_template_flag(p)
    args = p.parse_args(argv)
    mesh_shape = _serve_check(args)
    from llama_jax.serve.server import serve  # deferred: starlette / uvicorn are an extra

    serve(
        args.model_path,
        args.host,
        args.port,
        args.api_key,
        args.max_batch,
        args.max_seq_len,
        args.max_queue,
        args.dtype,
        mesh_shape,
        args.model_name,
        args.chat_template,
    )
    return 0


def _serve_check(args: argparse.Namespace) -> tuple[int, ...] | None:
    """Checks `llama3 serve`'s numbers before anything is loaded; returns the mesh shape."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port}; valid: 0 to 65535")
    for name, low in (("max_batch", 1), ("max_queue", 1), ("max_seq_len", 2)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name}={v}; valid: an int >= {low}")
    if args.mesh_shape is None:
        return None
    try:
        shape = tuple(int(x) for x in args.mesh_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"--mesh_shape={args.mesh_shape}; valid: three ints data,fsdp,tensor")
    return shape


def _eval(argv: list[str]) -> int:
    return eval_main(argv)


COMMANDS = {
    "train": (_train, "pretrain from an experiment config (experiments/*.py)"),
    "convert": (_convert, "convert models between Hugging Face, Meta, GGUF and llama_jax"),
    "finetune": (_finetune, "fine-tune a base model on chat data (full or LoRA)"),
    "tokenizer": (_tokenizer, "train, or encode/decode with, a tokenizer"),
    "generate": (_generate, "continue text prompts (streams to stdout)"),
    "chat": (_chat, "interactive chat in the model's chat format"),
    "serve": (_serve, "OpenAI-compatible HTTP server with continuous batching"),
    "eval": (_eval, "evaluate on built-in or lm-eval tasks (perplexity, choice, generation)"),
    "plan": (_plan, "compile an experiment for a TPU or GPU topology: memory, FLOPs, MFU bound"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something that cannot be done (not a bug)."""
    return (
        ValueError,
        KeyError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        OSError,  # a full disk, a read-only file system: named with its path, see _one_line
        ImportError,
        pickle.UnpicklingError,
        CheckpointError,
        NonFiniteLossError,
        DownloadError,  # a pinned archive pip could not fetch (offline, no index)
    )


def _one_line(e: BaseException) -> str:
    if type(e) is OSError and e.strerror:  # the bare OSError of a write: what, where, what to do
        where = f" writing {e.filename}" if e.filename else ""
        todo = {
            errno.ENOSPC: "free some space (or write elsewhere) and rerun",
            errno.EDQUOT: "free some space (or write elsewhere) and rerun",
            errno.EROFS: "write to a writable file system",
        }.get(e.errno, "check the path and rerun")
        return f"{e.strerror}{where}; {todo}"
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(str(text).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


DEBUG_FLAGS = ("--debug", "--verbose")


def main(argv: list[str] | None = None) -> int:
    """The `llama3` command. With `argv` (tests, scripts) it returns the exit code; without
    (the console script) it also makes sure a failing process really exits."""
    if argv is not None:
        return _main(list(argv))
    try:
        code = _main(sys.argv[1:])
    except SystemExit as e:  # argparse's usage errors (2) and --help (0)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # a bug: the traceback, then the same prompt exit
        traceback.print_exc()
        code = 1
    if code:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Exits with `code` now, without the interpreter's shutdown: a non-daemon thread (orbax's,
    waiting on a failed save) would keep it alive forever, and daemon threads of a failed read
    print tracebacks of their closed event loops while it tears down."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def _closed_loop(kind, value) -> bool:
    return kind is RuntimeError and str(value) == "Event loop is closed"


def _quiet_closed_loops(hook):
    """An excepthook that drops "Event loop is closed": tensorstore's reads of a checkpoint
    that failed to restore complete on native threads after orbax closed their event loop,
    and each prints that traceback; the failure itself is reported in one line."""

    def quiet(kind, value, tb):
        if not _closed_loop(kind, value):
            hook(kind, value, tb)

    return quiet


def _quiet_closed_loops_unraisable(hook):
    """The same for `sys.unraisablehook`, through which tensorstore's native threads report
    them (PyErr_WriteUnraisable with no object: a bare traceback on stderr)."""

    def quiet(unraisable):
        if not _closed_loop(unraisable.exc_type, unraisable.exc_value):
            hook(unraisable)

    return quiet


def _main(argv: list[str]) -> int:
    debug = any(a in DEBUG_FLAGS for a in argv) or os.environ.get("LLAMA_JAX_DEBUG", "") not in (
        "",
        "0",
    )
    argv = [a for a in argv if a not in DEBUG_FLAGS]
    if argv and argv[0] == "--version":
        print(f"llama3 (llama_jax) {__version__}")
        return 0
    if not debug:
        # orbax logs every failed background write as an error with its traceback (hundreds
        # of lines for one full disk); the CLI's one line names the failure instead.
        # asyncio reports the same failed writes again when their tasks are collected.
        for name in ("absl", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        sys.excepthook = _quiet_closed_loops(sys.excepthook)
        sys.unraisablehook = _quiet_closed_loops_unraisable(sys.unraisablehook)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print(
            "usage: llama3 <command> [options]   (--version; --debug: tracebacks)\n\n"
            "commands:\n" + "\n".join(lines)
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nllama3: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    fn, _ = COMMANDS[argv[0]]
    try:
        return fn(argv[1:])
    except _user_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
