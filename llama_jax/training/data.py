"""The trainer's tokenizer and data: load or train the tokenizer, split the data, iterators.

Steps 3 and 4 of `train.py`: `get_tokenizer` loads `tokenizer_path` or trains a SentencePiece
model on the training split once (process 0; the others wait); `data_splits` says which part of
`data_path` trains and which validates; `make_data` builds the host-sharded iterators
(pretraining documents, or fine-tuning dialogs from data/chat.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil

import jax
import ml_collections
from jax.experimental import multihost_utils

from llama_jax.data import make_eval_iterator, make_train_iterator, open_source, parse_data_path
from llama_jax.data.chat import make_chat_iterators
from llama_jax.model.config import ModelConfig
from llama_jax.tokenizer import load_tokenizer
from llama_jax.tokenizer.chat_template import read_template_file
from llama_jax.tokenizer.train import train_tokenizer

log = logging.getLogger("llama_jax.training.trainer")


# ============================================================================ 3. tokenizer
def get_tokenizer(c: ml_collections.ConfigDict):
    """Loads tokenizer_path, or trains a SentencePiece model on the training split once."""
    if c.tokenizer_path:
        tok = load_tokenizer(c.tokenizer_path)
        if c.get("chat_template"):
            tok.use_chat_settings(read_template_file(c.chat_template))
        return tok
    tok_dir = os.path.join(c.run_dir, "tokenizer")
    if os.path.isdir(tok_dir) and os.listdir(tok_dir):
        return load_tokenizer(tok_dir)
    corpus = os.path.join(c.run_dir, "tokenizer_corpus.txt")
    if jax.process_index() == 0:
        train_split, _ = data_splits(c)
        source = open_source(
            c.data_path,
            split=train_split,
            data_dir=c.data_dir or None,
            text_field=c.text_field,
            text_unit=c.text_unit,
        )
        docs = list(source.documents())
        start, stop = source.select(len(docs))
        if len(docs) == 1 and getattr(source, "is_sliced", False):  # held out by tokens later
            docs = [docs[0][slice(*source.token_range(len(docs[0])))]]
            start, stop = 0, 1
        log.info(
            "training a SentencePiece tokenizer (%d ids) on %d documents of %s",
            c.tokenizer_vocab_size,
            stop - start,
            c.data_path,
        )
        try:  # a failure (a full disk) leaves neither the corpus nor a half-made tokenizer
            with open(corpus, "w", encoding="utf-8") as f:
                for doc in docs[start:stop]:
                    f.write(doc.rstrip("\n") + "\n")
            _train_tokenizer(corpus, c.tokenizer_vocab_size, tok_dir + ".tmp", c.seed)
            os.replace(tok_dir + ".tmp", tok_dir)
        finally:
            shutil.rmtree(tok_dir + ".tmp", ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(corpus)
    _sync_hosts("tokenizer")
    return load_tokenizer(tok_dir)


def _train_tokenizer(corpus: str, vocab_size: int, out_dir: str, seed: int) -> None:
    """SentencePiece on the corpus, quietly; a corpus too small for vocab_size gets the
    largest vocabulary SentencePiece says it supports (logged)."""
    try:
        train_tokenizer(corpus, vocab_size, out_dir, seed=seed, show_progress=False)
    except ValueError as e:
        m = re.search(
            r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e)
        )
        if not m:
            raise
        log.warning(
            "the training data supports at most %s tokenizer ids, not %s: using %s",
            m[2],
            vocab_size,
            m[2],
        )
        train_tokenizer(corpus, int(m[2]), out_dir, seed=seed, show_progress=False)


def _sync_hosts(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ============================================================================ 4. data


def data_splits(c: ml_collections.ConfigDict) -> tuple[str, str | None]:
    """(train split, validation split or None) of data_path.

    A separate local valid_data_path is its whole set ("train", local files' one split). A
    local data_path with no validation given holds out its last `valid_fraction` of documents
    (of tokens, when it is a single document); 0 means no validation.
    """
    local = lambda p: parse_data_path(p).scheme == "files"
    if c.valid_data_path:
        return c.train_split, ("train" if local(c.valid_data_path) else c.valid_split)
    if local(c.data_path) and (c.train_split, c.valid_split) == ("train", "validation"):
        if c.valid_fraction <= 0:
            return "train", None
        pct = f"{100 * (1 - c.valid_fraction):g}%"
        return f"train[:{pct}]", f"train[{pct}:]"
    return c.train_split, c.valid_split


def make_data(c: ml_collections.ConfigDict, tokenizer, mesh, model_cfg: ModelConfig):
    if c.data_format == "chat":  # fine-tuning dialogs (data/chat.py); eval may be None
        train_it, eval_it, _ = make_chat_iterators(
            c.data_path,
            tokenizer,
            seq_len=c.seq_len,
            global_batch_size=c.batch_size,
            mesh=mesh,
            seed=c.seed,
            num_epochs=None if c.num_steps > 0 else c.num_epochs,
            valid_data_path=c.valid_data_path,
            train_split=c.train_split,
            valid_split=c.valid_split,
            data_dir=c.data_dir or None,
            train_on=c.train_on,
            truncation=c.truncation,
        )
        return train_it, eval_it
    train_split, valid_split = data_splits(c)
    if valid_split and not c.valid_data_path and valid_split != c.valid_split:
        log.info(
            "no valid_data_path: holding out the last %g%% of %s for validation (split %r; "
            "--config.valid_fraction sets the share)",
            100 * c.valid_fraction,
            c.data_path,
            valid_split,
        )

    common = dict(
        seq_len=c.seq_len,
        global_batch_size=c.batch_size,
        mesh=mesh,
        max_seq_len=model_cfg.max_seq_len,
        add_bos=c.add_bos,
        add_eos=c.add_eos,
        data_dir=c.data_dir or None,
        cache_dir=c.cache_dir or os.path.join(c.run_dir, "token_cache"),
        text_field=c.text_field,
        text_unit=c.text_unit,
    )
    train_it = make_train_iterator(
        c.data_path,
        tokenizer,
        seed=c.seed,
        split=train_split,
        num_epochs=None if c.num_steps > 0 else c.num_epochs,
        **common,
    )
    eval_it = None
    if valid_split is not None:
        eval_it = make_eval_iterator(
            c.valid_data_path or c.data_path, tokenizer, split=valid_split, **common
        )
    return train_it, eval_it
