"""The data pipeline: sources -> tokenise once (cached) -> pack -> host-sharded resumable loader.

The trainer calls::

    train = make_train_iterator(data_path, tokenizer, seq_len=T, global_batch_size=B,
                                mesh=mesh, seed=seed, max_seq_len=cfg.max_seq_len)
    batch = next(train)          # {"inputs", "targets", "segment_ids", "positions",
                                 #  "loss_mask"}: jax.Array [B, T] sharded P(("data","fsdp"))
    state = train.get_state()    # small JSON-able dict -> checkpoint; train.set_state(state)
    for batch in make_eval_iterator(data_path, tokenizer, seq_len=T, global_batch_size=B,
                                    mesh=mesh): ...

Modules: `sources` (data_path parsing, TFDS / local files), `shakespeare` (the built-in TFDS
corpus; imported lazily since it needs tensorflow_datasets), `tokens` (tokenizer protocol,
token cache), `packing` (the packing rule), `loader` (iterators).
"""

from llama_jax.data.loader import (
    STATE_FORMAT,
    EvalIterator,
    TrainIterator,
    make_eval_iterator,
    make_train_iterator,
)
from llama_jax.data.packing import BATCH_KEYS, Packer, PackSpec
from llama_jax.data.sources import DataPath, open_source, parse_data_path
from llama_jax.data.tokens import TokenizedCorpus, Tokenizer, load_or_build, tokenizer_fingerprint

__all__ = [
    "BATCH_KEYS",
    "DataPath",
    "EvalIterator",
    "PackSpec",
    "Packer",
    "STATE_FORMAT",
    "TokenizedCorpus",
    "Tokenizer",
    "TrainIterator",
    "load_or_build",
    "make_eval_iterator",
    "make_train_iterator",
    "open_source",
    "parse_data_path",
    "tokenizer_fingerprint",
]
