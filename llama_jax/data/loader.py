"""Loading: host-sharded, prefetched, resumable global batches for the trainer.

The training stream is the concatenation of the epochs' shuffled row orders (see `packing`):
slot k of the stream is row ``k % R`` of epoch ``k // R`` (R rows per epoch), and global batch
``step`` holds slots ``[step * B, (step + 1) * B)``. With `num_epochs` set, the slots past the
last epoch are padding rows (`loss_mask` 0) and the stream ends after that batch; with None it
never ends. A batch is a pure function of its step, so

- the iterator state is just the next step (plus the configuration it is valid for): restoring
  it yields exactly the batches that would have come next, in any process;
- each host computes only its own rows of each batch -- the rows its devices hold under
  ``NamedSharding(mesh, P(("data", "fsdp"), None))`` -- reading only those tokens from the
  memory-mapped cache, and the same global batch comes out for any number of hosts;
- grain does the rest: ``grain.MapDataset.range(steps).map(make_batch)`` turned into an
  `IterDataset` whose threads compute (and transfer to device) the next batches in the
  background, with a checkpointable `{"next_index": step}` iterator state.

Validation batches pack the split once in corpus order (no shuffling); the last batch is padded
with empty rows, so the loss summed over `loss_mask` covers every prediction exactly once and
is the same at every evaluation. Iterating an `EvalIterator` always starts from the beginning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.data import sources, tokens
from llama_jax.data.packing import BATCH_KEYS, Packer, PackSpec

log = logging.getLogger("llama_jax.data")

STATE_FORMAT = "llama_jax.data.TrainIterator/1"
Batch = dict[str, Any]  # BATCH_KEYS -> jax.Array [B, T] (or host-local np.ndarray [B/P, T])


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _local_rows(
    mesh: Mesh | None,
    batch_axes: tuple[str, ...],
    global_batch_size: int,
    seq_len: int,
    process_index: int | None,
    process_count: int | None,
) -> tuple[np.ndarray, NamedSharding | None]:
    """The rows of each global batch this host computes, and the batch sharding.

    Checks the batch geometry before anything expensive runs.
    """
    b = global_batch_size
    if mesh is None:
        count = jax.process_count() if process_count is None else process_count
        count = _check_int("process_count", count, minimum=1)
        index = jax.process_index() if process_index is None else process_index
        index = _check_int("process_index", index, minimum=0)
        if index >= count:
            raise ValueError(f"process_index={index} must be < process_count={count}")
        if b % count:
            raise ValueError(
                f"global_batch_size={b} is not divisible by process_count={count}; use a "
                f"multiple of {count}"
            )
        per = b // count
        return np.arange(index * per, (index + 1) * per), None

    real = (jax.process_index(), jax.process_count())
    given = (
        real[0] if process_index is None else process_index,
        real[1] if process_count is None else process_count,
    )
    if given != real:
        raise ValueError(
            f"process_index/process_count={given} differ from JAX's {real}; with a mesh the "
            "hosts are JAX's processes (simulate hosts with mesh=None)"
        )
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"mesh axes {mesh.axis_names} lack the batch axes {missing}; pass batch_axes= "
            "naming the mesh axes the batch is sharded over"
        )
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if b % shards:
        axes = "*".join(f"{a}={mesh.shape[a]}" for a in batch_axes)
        raise ValueError(
            f"global_batch_size={b} is not divisible by the batch axes of the mesh ({axes} = "
            f"{shards}); use a multiple of {shards}"
        )
    if b % real[1]:
        raise ValueError(
            f"global_batch_size={b} is not divisible by the process count {real[1]}; use a "
            f"multiple of {real[1]}"
        )
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes, None))
    spans = {
        (idx[0].start or 0, b if idx[0].stop is None else idx[0].stop)
        for idx in sharding.addressable_devices_indices_map((b, seq_len)).values()
    }
    # jax.make_array_from_process_local_data maps the local array onto these row spans in
    # sorted order, which is the order we compute them in.
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in sorted(spans)])
    return rows, sharding


class _MakeBatch:
    """step -> this host's rows of global batch `step` (as numpy, or as global jax.Arrays)."""

    def __init__(
        self,
        packer: Packer,
        global_batch_size: int,
        rows: np.ndarray,
        num_epochs: int | None,
        sharding: NamedSharding | None,
    ) -> None:
        self.packer = packer
        self.global_batch_size = global_batch_size
        self.rows = rows.astype(np.int64)
        self.num_epochs = num_epochs
        self.sharding = sharding

    def numpy(self, step: int) -> dict[str, np.ndarray]:
        k = int(step) * self.global_batch_size + self.rows  # slots of the training stream
        r = self.packer.rows_per_epoch
        epochs, slots = k // r, k % r
        if self.num_epochs is not None:
            slots = np.where(epochs < self.num_epochs, slots, -1)
        return self.packer.rows(epochs, slots)

    def __call__(self, step: int) -> Batch:
        batch = self.numpy(step)
        if self.sharding is None:
            return batch
        shape = (self.global_batch_size, self.packer.spec.seq_len)
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, shape)
            for k, v in batch.items()
        }


def _grain_iter(
    make_batch: Callable[[int], Batch], num_steps: int, prefetch: int, num_threads: int
) -> Any:
    prefetch = _check_int("prefetch", prefetch, minimum=0)
    num_threads = _check_int("num_threads", num_threads, minimum=0)
    ds = grain.MapDataset.range(num_steps).map(make_batch)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read))


class TrainIterator:
    """Training batches: an endless (or `num_epochs`-long) iterator with a JSON-able state.

    Each item is a dict of `BATCH_KEYS` -> global `jax.Array` [B, T] sharded over the mesh's
    batch axes (host-local `np.ndarray` [B / process_count, T] when built with mesh=None).

    Attributes:
      num_steps: batches in the stream, or None when it repeats forever.
      rows_per_epoch: R, packed rows in one epoch.
      tokens_per_epoch: corpus tokens (with BOS/EOS) in one epoch.
      steps_per_epoch: R / B (an epoch boundary may fall inside a batch).
    """

    def __init__(
        self,
        make_batch: _MakeBatch,
        *,
        num_steps: int | None,
        config: dict[str, Any],
        prefetch: int,
        num_threads: int,
    ) -> None:
        self._make_batch = make_batch
        self.num_steps = num_steps
        self.config = config
        self.rows_per_epoch = make_batch.packer.rows_per_epoch
        self.tokens_per_epoch = make_batch.packer.num_tokens
        self.steps_per_epoch = self.rows_per_epoch / make_batch.global_batch_size
        self._it = _grain_iter(
            make_batch, sys.maxsize if num_steps is None else num_steps, prefetch, num_threads
        )
        if prefetch > 0 and num_threads > 0:
            self._it.start_prefetch()  # have the first batches ready before the first step

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    @property
    def step(self) -> int:
        """The step of the batch `next()` returns."""
        return int(self._it.get_state()["next_index"])

    def get_state(self) -> dict[str, Any]:
        """The position in the stream, as a small JSON-able dict (store it in checkpoints)."""
        return {"format": STATE_FORMAT, "step": self.step, "config": dict(self.config)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` result (of this or another process).

        Raises:
          ValueError: the state is malformed, was made for a different corpus or batch
            configuration, or lies past the end of this (finite) stream.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a data iterator state (expected format {STATE_FORMAT!r}): {state!r:.200}"
            )
        diff = {
            k: (state["config"].get(k), v)
            for k, v in self.config.items()
            if state["config"].get(k) != v
        }
        if diff:
            raise ValueError(
                "the data iterator state was saved for a different pipeline; differing "
                f"settings (saved, now): {diff}"
            )
        step = _check_int("state['step']", state["step"], minimum=0)
        if self.num_steps is not None and step > self.num_steps:
            raise ValueError(
                f"state step {step} is past the end of this stream ({self.num_steps} steps); "
                "raise num_epochs"
            )
        self._it.set_state({"next_index": step})

    # torch-style aliases
    state_dict = get_state
    load_state_dict = set_state

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of batch `step` as numpy (no prefetch, no device transfer)."""
        return self._make_batch.numpy(step)

    def close(self) -> None:
        """Stops the prefetch threads."""
        self._it.close()


class EvalIterator:
    """Validation batches over the whole split, in order; every `iter()` starts afresh.

    Items are as for `TrainIterator`. The last batch is padded with empty rows.

    Attributes:
      num_steps: batches per pass (also `len()`).
      num_predictions: the number of positions with loss_mask 1 in one pass (all hosts).
    """

    def __init__(self, make_batch: _MakeBatch, *, prefetch: int, num_threads: int) -> None:
        _check_int("prefetch", prefetch, minimum=0)
        _check_int("num_threads", num_threads, minimum=0)
        self._make_batch = make_batch
        packer = make_batch.packer
        self.num_steps = math.ceil(packer.rows_per_epoch / make_batch.global_batch_size)
        # Within-document predictions: every token but the first of each document.
        self.num_predictions = packer.num_tokens - packer.num_documents
        self._prefetch, self._num_threads = prefetch, num_threads

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[Batch]:
        return _grain_iter(self._make_batch, self.num_steps, self._prefetch, self._num_threads)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a data iterator reads and how it cuts it into batches (everything but the mesh).

    Attributes:
      data_path: "tfds:NAME[/CONFIG][:VERSION]", "shakespeare" or a local file/dir/glob.
      seq_len: T, tokens per row.
      global_batch_size: B, rows per global batch (all hosts).
      split: "train", "validation", or a slice such as "train[:95%]".
      seed: shuffling seed (documents and rows, reshuffled every epoch).
      num_epochs: stop after this many passes; None repeats forever.
      shuffle: False keeps corpus order (still repeats per epoch).
      max_seq_len: the model's maximum sequence length, checked against `seq_len`.
      add_bos, add_eos: wrap each document in BOS ... EOS.
      data_dir: TFDS data dir. cache_dir: token cache dir. manual_dir: manual downloads.
      download: prepare TFDS datasets that are not prepared yet.
      text_field: JSON field / parquet column / TFDS feature holding the text.
      text_unit: what one document of a .txt file is: "document" (the file), "paragraph"
        (blank-line separated) or "line".
      batch_axes: mesh axes the batch dimension is sharded over.
      process_index, process_count: this host and the host count (default: JAX's). Only
        with mesh=None may they differ from JAX's (to simulate hosts in one process).
      prefetch: batches computed ahead by background threads.
      num_threads: background threads computing batches.
      num_workers: threads tokenising (first run only).
    """

    data_path: str
    seq_len: int
    global_batch_size: int
    split: str = "train"
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    max_seq_len: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    data_dir: str | None = None
    cache_dir: str | None = None
    manual_dir: str | None = None
    download: bool = True
    text_field: str = "text"
    text_unit: str = "document"
    batch_axes: tuple[str, ...] = ("data", "fsdp")
    process_index: int | None = None
    process_count: int | None = None
    prefetch: int = 2
    num_threads: int = 2
    num_workers: int | None = None


def _build(cfg: DataConfig, tokenizer: Any, mesh: Mesh | None) -> tuple[_MakeBatch, dict[str, Any]]:
    (data_path, split, seq_len, global_batch_size, shuffle, seed, num_epochs, max_seq_len) = (
        cfg.data_path,
        cfg.split,
        cfg.seq_len,
        cfg.global_batch_size,
        cfg.shuffle,
        cfg.seed,
        cfg.num_epochs,
        cfg.max_seq_len,
    )
    # Everything a user can get wrong is checked before any reading or tokenising.
    tokens.check_tokenizer(tokenizer)
    tokens.tokenizer_fingerprint(tokenizer)
    seq_len = _check_int("seq_len", seq_len, minimum=1)
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's max_seq_len={max_seq_len}; use "
            f"seq_len <= {max_seq_len}"
        )
    global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    rows, sharding = _local_rows(
        mesh,
        tuple(cfg.batch_axes),
        global_batch_size,
        seq_len,
        cfg.process_index,
        cfg.process_count,
    )
    dp = sources.parse_data_path(data_path)
    source = sources.open_source(
        dp,
        split=split,
        data_dir=cfg.data_dir,
        manual_dir=cfg.manual_dir,
        download=cfg.download,
        text_field=cfg.text_field,
        text_unit=cfg.text_unit,
    )
    corpus = tokens.load_or_build(
        source, tokenizer, cache_dir=cfg.cache_dir, num_workers=cfg.num_workers
    )
    corpus_tokens, offsets = corpus.tokens, corpus.offsets
    doc_range = source.select(corpus.num_documents)
    token_range = None
    if corpus.num_documents == 1 and getattr(source, "is_sliced", False):
        # One document cannot be split by documents: the split applies to its tokens.
        start, stop = int(offsets[0]), int(offsets[1])
        token_range = source.token_range(stop - start)
        corpus_tokens = corpus_tokens[start + token_range[0] : start + token_range[1]]
        offsets = np.array([0, len(corpus_tokens)], dtype=np.int64)
        doc_range = (0, 1) if len(corpus_tokens) else (0, 0)
        log.info(
            "%s is a single document: split %r takes tokens [%d, %d) of %d",
            source.description,
            split,
            *token_range,
            stop - start,
        )
    if doc_range[1] <= doc_range[0]:
        raise ValueError(
            f"split={split!r} of {source.description} selects no documents (it has "
            f"{corpus.num_documents})"
        )
    spec = PackSpec(
        seq_len=seq_len,
        bos_id=int(tokenizer.bos_id) if cfg.add_bos else None,
        eos_id=int(tokenizer.eos_id) if cfg.add_eos else None,
        # Padding is told apart by segment_ids == 0 and loss_mask == 0, never by its value, so
        # a tokenizer without a pad token (pad_id None) pads with EOS.
        pad_id=int(tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id),
    )
    packer = Packer(corpus_tokens, offsets, spec, seed=seed, shuffle=shuffle, doc_range=doc_range)
    if packer.num_tokens == 0:
        raise ValueError(f"{source.description} split {split!r} holds no tokens")
    config = {
        "corpus": corpus.content_hash,
        "documents": list(doc_range),
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "bos_id": spec.bos_id,
        "eos_id": spec.eos_id,
        "pad_id": spec.pad_id,
    }
    if token_range is not None:
        config["tokens"] = list(token_range)
    return _MakeBatch(packer, global_batch_size, rows, num_epochs, sharding), config


def make_train_iterator(
    data_path: str, tokenizer: tokens.Tokenizer, *, mesh: Mesh | None, **options: Any
) -> TrainIterator:
    """The trainer's data: packed, shuffled, host-sharded, prefetched, resumable batches.

    Args:
      data_path: "tfds:NAME[/CONFIG][:VERSION]", "shakespeare" or a local file/dir/glob.
      tokenizer: see `llama_jax.data.Tokenizer`.
      mesh: the trainer's mesh; batches are global jax.Arrays sharded
        ``P(batch_axes, None)``. None yields this host's numpy rows instead.
      **options: the other fields of `DataConfig` (`seq_len` and `global_batch_size` are
        required).

    Returns:
      A `TrainIterator`; its items are dicts of `BATCH_KEYS` -> [B, T] arrays.
    """
    cfg = DataConfig(data_path, **options)
    make_batch, config = _build(cfg, tokenizer, mesh)
    num_steps = None
    if cfg.num_epochs is not None:
        rows = make_batch.packer.rows_per_epoch
        num_steps = math.ceil(cfg.num_epochs * rows / cfg.global_batch_size)
    return TrainIterator(
        make_batch,
        num_steps=num_steps,
        config=config,
        prefetch=cfg.prefetch,
        num_threads=cfg.num_threads,
    )


def make_eval_iterator(
    data_path: str, tokenizer: tokens.Tokenizer, *, mesh: Mesh | None, **options: Any
) -> EvalIterator:
    """Validation batches: the whole split once, in order, last batch padded.

    Arguments as for `make_train_iterator`; the split defaults to "validation", and seed,
    shuffling and epochs do not apply. For a local corpus, hold documents out with a slice,
    e.g. split="train[95%:]" here and "train[:95%]" for training.

    Returns:
      An `EvalIterator`: iterable (restarting at every `iter()`), with `len()` batches.
    """
    for name in ("seed", "shuffle", "num_epochs"):
        if name in options:
            raise TypeError(
                f"make_eval_iterator takes no {name!r}: validation reads in order, once"
            )
    options = {"split": "validation", **options}
    cfg = DataConfig(data_path, shuffle=False, seed=0, num_epochs=1, **options)
    make_batch, _ = _build(cfg, tokenizer, mesh)
    return EvalIterator(make_batch, prefetch=cfg.prefetch, num_threads=cfg.num_threads)


__all__ = [
    "BATCH_KEYS",
    "DataConfig",
    "EvalIterator",
    "STATE_FORMAT",
    "TrainIterator",
    "make_eval_iterator",
    "make_train_iterator",
]
