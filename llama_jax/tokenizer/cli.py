"""The `llama3 tokenizer {train,encode,decode,info}` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llama_jax.tokenizer.load import load_tokenizer
from llama_jax.tokenizer.train import MODEL_TYPES, train_tokenizer

TOKENIZER_HELP = "tokenizer file, model directory, GGUF file or built-in model name"


def build_cli_parser(prog: str = "llama3 tokenizer") -> argparse.ArgumentParser:
    """The `llama3 tokenizer` argument parser: subcommands train, encode, decode, info."""
    parser = argparse.ArgumentParser(prog=prog, description="Train or inspect a tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a SentencePiece BPE tokenizer on text files")
    train.add_argument("--input", action="append", required=True, help="file or glob; repeatable")
    train.add_argument("--vocab_size", "--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="directory to write tokenizer.model to")
    train.add_argument("--model_type", "--model-type", default="bpe", choices=MODEL_TYPES)
    train.add_argument("--character_coverage", "--character-coverage", type=float, default=0.9995)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--input_sentence_size",
        "--input-sentence-size",
        type=int,
        default=10_000_000,
        help="lines sampled (seeded) for training; 0 uses every line",
    )
    train.add_argument(
        "--num_reserved_special_tokens", "--num-reserved-special-tokens", type=int, default=0
    )
    train.add_argument("--quiet", action="store_true", help="no progress output")

    encode = sub.add_parser("encode", help="print the ids of a text")
    encode.add_argument(
        "--tokenizer",
        required=True,
        help=TOKENIZER_HELP,
    )
    encode.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
    encode.add_argument("--bos", action="store_true", help="prepend the bos id")
    encode.add_argument("--eos", action="store_true", help="append the eos id")
    encode.add_argument(
        "--allow_special",
        "--allow-special",
        action="store_true",
        help="encode special-token text (e.g. <|eot_id|>) as the special ids",
    )

    decode = sub.add_parser("decode", help="print the text of ids")
    decode.add_argument(
        "--tokenizer",
        required=True,
        help=TOKENIZER_HELP,
    )
    decode.add_argument("ids", nargs="*", type=int, help="ids (default: read stdin)")

    info = sub.add_parser("info", help="print format, vocabulary size and special ids")
    info.add_argument(
        "--tokenizer",
        required=True,
        help=TOKENIZER_HELP,
    )
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Runs a parsed `llama3 tokenizer` command; returns the exit status."""
    if args.command == "train":
        tok = train_tokenizer(
            args.input,
            args.vocab_size,
            args.output,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            seed=args.seed,
            input_sentence_size=args.input_sentence_size,
            num_reserved_special_tokens=args.num_reserved_special_tokens,
            show_progress=not args.quiet,
        )
        print(f"wrote {tok.path} (vocab_size {tok.vocab_size})")
        return 0
    tok = load_tokenizer(args.tokenizer)
    if args.command == "encode":
        text = sys.stdin.read() if args.text is None else args.text
        allowed = "all" if args.allow_special else ()
        print(*tok.encode(text, bos=args.bos, eos=args.eos, allowed_special=allowed))
    elif args.command == "decode":
        ids = args.ids or [int(i) for i in sys.stdin.read().split()]
        sys.stdout.write(tok.decode(ids) + "\n")
    else:
        print(f"format: {tok.FORMAT}\npath: {tok.path}\nvocab_size: {tok.vocab_size}")
        print(f"bos_id: {tok.bos_id}\neos_id: {tok.eos_id}\npad_id: {tok.pad_id}")
        print(f"stop_ids: {' '.join(map(str, tok.stop_ids))}")
        template = tok.chat_template
        print(
            "chat_template: "
            + (f"the model's ({len(template)} characters)" if template else "built-in Llama 3")
        )
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama3 tokenizer {train,encode,decode,info} ...`.

    Args:
      argv: arguments after `tokenizer` (default: sys.argv[1:]).

    Returns:
      The exit status: 0 on success, 1 on a user error (message on stderr).
    """
    args = build_cli_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
