"""Training a SentencePiece BPE tokenizer that speaks the Llama 3 chat format.

The model is written to `<output_dir>/tokenizer.model` and loads with `load_tokenizer`. It keeps
text exactly (identity normalisation, no dummy prefix, whitespace kept, byte fallback for every
character outside the learned vocabulary) and carries the Llama 3 special tokens as control
symbols, so `encode_dialog` works with it.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax.atomic import write_atomic
from llama_jax.tokenizer.chat import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_MESSAGE,
    END_OF_TEXT,
    END_OF_TURN,
    FINETUNE_RIGHT_PAD,
    PYTHON_TAG,
    START_HEADER,
)
from llama_jax.tokenizer.spm import SentencePieceTokenizer

UNK = "<unk>"
# Special tokens as control symbols, not user_defined_symbols: SentencePiece matches a
# user-defined symbol wherever its text occurs in the input, so a user typing "<|eot_id|>" would
# forge an end of turn. Control symbols are never produced from text; `encode` and
# `encode_dialog` insert their ids, and `allowed_special` opts in to matching them.
CONTROL_SYMBOLS = (START_HEADER, END_HEADER, END_OF_MESSAGE, END_OF_TURN, PYTHON_TAG)
# Newline is a user-defined symbol (matched in text, as it should be): training reads one line
# per sentence, so without it every newline would cost a byte-fallback token.
USER_DEFINED_SYMBOLS = ("\n",)
NUM_BYTES = 256
MODEL_TYPES = ("bpe", "unigram")
# SentencePiece silently skips sentences longer than `max_sentence_length` bytes; lines are cut
# to MAX_LINE_CHARS characters (at most 4 bytes each) so that nothing is skipped.
MAX_LINE_CHARS = 4096


def special_pieces(num_reserved_special_tokens: int = 0) -> list[str]:
    """The pieces at the start of a trained vocabulary, in id order (from 0).

    Args:
      num_reserved_special_tokens: extra `<|reserved_special_token_{i}|>` control symbols.

    Returns:
      unk, bos, eos, pad, the chat control symbols, the reserved tokens, then the
      user-defined symbols.
    """
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(num_reserved_special_tokens)]
    return [
        UNK,
        BEGIN_OF_TEXT,
        END_OF_TEXT,
        FINETUNE_RIGHT_PAD,
        *CONTROL_SYMBOLS,
        *reserved,
        *USER_DEFINED_SYMBOLS,
    ]


def min_vocab_size(num_reserved_special_tokens: int = 0) -> int:
    """Smallest vocab_size `train_tokenizer` accepts: special pieces, 256 bytes, one learned."""
    return len(special_pieces(num_reserved_special_tokens)) + NUM_BYTES + 1


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths and glob patterns, in order, each once.

    Args:
      inputs: a path or glob (`**` recurses), or a sequence of them.

    Returns:
      The files; a pattern matching no file is a FileNotFoundError.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: dict[Path, None] = {}
    for pattern in map(os.fspath, inputs):
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches and os.path.isfile(pattern):
            matches = [pattern]
        if not matches:
            raise FileNotFoundError(f"no training text file matches {pattern!r}")
        files.update((Path(m), None) for m in matches)
    return list(files)


def _sentences(files: list[Path], show_progress: bool) -> Iterator[str]:
    """Non-empty lines of the files, cut to MAX_LINE_CHARS, with a progress bar over bytes."""
    total = sum(f.stat().st_size for f in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="reading text", disable=not show_progress
    ) as bar:
        for f in files:
            bar.set_postfix_str(f.name)
            done = 0
            with open(f, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    done += len(raw)
                    if done > 1 << 20:  # a bar update per line would cost more than it shows
                        bar.update(done)
                        done = 0
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{f}:{lineno} is not UTF-8 text: {e}") from e
                    for start in range(0, len(line), MAX_LINE_CHARS):
                        yield line[start : start + MAX_LINE_CHARS]
            bar.update(done)


def _seeded_sample(files: list[Path], size: int, seed: int, show_progress: bool) -> Iterator[str]:
    """`size` sentences drawn uniformly with `seed` (all of them when there are no more), in
    their order in the files.

    SentencePiece's own sampling (`input_sentence_size`) ignores `spm.set_random_generator_seed`
    when it trains from an iterator: its generator is thread-local and seeded from the device,
    so the sample, and the model, changed from one process to the next whatever the seed. The
    sample is drawn here instead: one pass counts the sentences, a second yields the chosen ones.
    """
    if size <= 0:
        yield from _sentences(files, show_progress)
        return
    count = sum(1 for _ in _sentences(files, False))
    if count <= size:
        yield from _sentences(files, show_progress)
        return
    chosen = np.sort(np.random.default_rng(seed).choice(count, size, replace=False))
    k = 0
    for i, sentence in enumerate(_sentences(files, show_progress)):
        if k < size and chosen[k] == i:
            k += 1
            yield sentence


def train_tokenizer(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    output_dir: str | os.PathLike,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    seed: int = 0,
    input_sentence_size: int = 10_000_000,
    num_reserved_special_tokens: int = 0,
    show_progress: bool = True,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece tokenizer with byte fallback and the Llama 3 special tokens.

    The result is reproducible: the same files, arguments and seed give a byte-identical model
    (one training thread, a seeded line sample, and no paths recorded in the model).

    Args:
      inputs: UTF-8 text files: a path or glob, or a sequence of them. Each line is a sentence.
      vocab_size: total ids, including special tokens and the 256 byte-fallback pieces.
      output_dir: directory to write `tokenizer.model` to (created if missing).
      model_type: "bpe" (as Llama) or "unigram".
      character_coverage: share of characters (by frequency) that get their own piece; the
        rest are spelled in bytes. 0.9995 suits large character sets, 1.0 small ones.
      seed: seed of the line sample.
      input_sentence_size: lines sampled for training when there are more; 0 uses every line.
      num_reserved_special_tokens: extra `<|reserved_special_token_{i}|>` control symbols.
      show_progress: a progress bar over the bytes read and SentencePiece's log on stderr.

    Returns:
      The trained tokenizer, loaded from `output_dir/tokenizer.model`.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    smallest = min_vocab_size(num_reserved_special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the {smallest - NUM_BYTES - 1} special pieces "
            f"and {NUM_BYTES} byte-fallback pieces need vocab_size >= {smallest}"
        )
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if num_reserved_special_tokens < 0:
        raise ValueError(
            f"num_reserved_special_tokens must be >= 0, got {num_reserved_special_tokens}"
        )
    if input_sentence_size < 0:
        raise ValueError(f"input_sentence_size must be >= 0, got {input_sentence_size}")
    files = expand_inputs(inputs)
    controls = special_pieces(num_reserved_special_tokens)[4 : -len(USER_DEFINED_SYMBOLS)]

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            # An iterator and an in-memory writer keep input and output paths out of the model,
            # so the file is the same wherever it is trained.
            sentence_iterator=_seeded_sample(files, input_sentence_size, seed, show_progress),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=0,  # sampled by _seeded_sample, reproducibly
            shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_LINE_CHARS,
            # The model file records the thread count: one thread makes it byte-identical on
            # every machine (BPE merges are single-threaded anyway; only loading is parallel).
            num_threads=1,
            byte_fallback=True,
            split_digits=True,
            # Keep text exactly so that decode(encode(x)) == x: no NFKC, no whitespace folding,
            # no space added in front.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BEGIN_OF_TEXT,
            eos_piece=END_OF_TEXT,
            pad_piece=FINETUNE_RIGHT_PAD,
            control_symbols=controls,
            user_defined_symbols=list(USER_DEFINED_SYMBOLS),
            minloglevel=0 if show_progress else 2,
        )
    except RuntimeError as e:
        # SentencePiece's own checks (e.g. a corpus too small for vocab_size, or more distinct
        # characters than vocab_size can hold) come back as RuntimeError("Internal: ...").
        raise ValueError(f"SentencePiece could not train on {len(files)} file(s): {e}") from e

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SentencePieceTokenizer.FILE_NAME
    write_atomic(path, model.getvalue())  # a full disk leaves no partial model and no .tmp
    return SentencePieceTokenizer(path)
