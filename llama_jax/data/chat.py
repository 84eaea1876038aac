"""Chat / instruction data for supervised fine-tuning: rows -> one encoding -> loss mask -> packs.

Sources (`data_path`):
  - a local ``.jsonl`` (one row per line), ``.json`` (a list of rows) or ``.parquet`` file, a
    directory of them or a glob;
  - ``tfds:NAME[/CONFIG][:VERSION]`` whose examples carry the same fields;
  - ``chatterbot/en`` / ``chatterbot/zh`` (the built-in corpus of `chatterbot.py`).
Rows, in the formats people already have:
  - ``{"messages": [{"role": "system|user|assistant", "content": ...}, ...]}`` (OpenAI / HF);
  - ``{"prompt": ..., "completion": ...}``  -> user, assistant;
  - ``{"instruction": ..., "input": ..., "output": ...}`` (Alpaca) -> user
    ``instruction + "\\n\\n" + input`` (just the instruction when input is empty), assistant.

Each dialog is rendered ONCE with the tokenizer's chat format (the model's own chat template,
or the built-in Llama 3 format: `Tokenizer.encode_dialog_masked`); the loss mask comes from that
single encoding, so no id ever changes at a prompt/answer seam. `train_on`:
  - ``assistant``: the content and end-of-turn token (`<|eot_id|>`, `<|im_end|>`, ...) of
    every assistant turn;
  - ``last``: those of the last assistant turn only;
  - ``all``: every token.
A token is a training target when its mask is 1: position i of a row predicts token i + 1 with
``loss_mask[i] = mask[i + 1]``.

Packing: dialogs are laid out once (in an order shuffled by `seed`) into rows of `seq_len`
input tokens, next-fit and never split: each dialog is its own segment (`segment_ids` 1, 2, ...
per row, 0 padding; `positions` from 0 per dialog). The row order is reshuffled every epoch. A
dialog with more than `seq_len` predictions is cut (`truncation = right`, keeping its start) or
dropped (`drop`); dialogs with no assistant turn are skipped. Every such count is reported in
`ChatStats` and logged, never silent.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from llama_jax.data import chatterbot, loader
from llama_jax.data.packing import permutation
from llama_jax.data.sources import parse_data_path
from llama_jax.data.tfds import tfds_builder

log = logging.getLogger("llama_jax.data.chat")

TRAIN_ON = ("assistant", "last", "all")
TRUNCATION = ("drop", "right")
SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- rows -> dialogs
def row_to_messages(row: Any, where: str) -> list[dict[str, str]]:
    """A row in any supported format -> chat messages; a clear error naming `where` otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in row.items()}
    if "messages" in row:
        msgs = row["messages"]
        if hasattr(msgs, "tolist"):
            msgs = msgs.tolist()
        if isinstance(msgs, dict) and "role" in msgs and "content" in msgs:  # columnar (TFDS)
            msgs = [{"role": r, "content": c} for r, c in zip(msgs["role"], msgs["content"])]
        if not isinstance(msgs, list):
            raise ValueError(f"{where}: 'messages' must be a list, got {type(msgs).__name__}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: message {i} must have 'role' and 'content': {m!r:.100}")
            role, content = m["role"], m["content"]
            role = role.decode() if isinstance(role, bytes) else role
            content = content.decode() if isinstance(content, bytes) else content
            if role not in ROLES:
                raise ValueError(
                    f"{where}: message {i} has unknown role {role!r}; valid: {', '.join(ROLES)}"
                )
            if not isinstance(content, str):
                raise ValueError(f"{where}: message {i} content must be a string")
            out.append({"role": role, "content": content})
        return out
    if "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError(f"{where}: 'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    if "instruction" in row and "output" in row:
        ins, inp, out = row["instruction"], row.get("input") or "", row["output"]
        if not all(isinstance(x, str) for x in (ins, inp, out)):
            raise ValueError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        user = f"{ins}\n\n{inp}" if inp.strip() else ins
        return [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    raise ValueError(
        f"{where}: a row needs 'messages', or 'prompt' + 'completion', or 'instruction' + "
        f"'output' (Alpaca); it has {sorted(row)}"
    )


def _files(path: str) -> list[str]:
    path = os.path.expanduser(path.removeprefix("file:"))
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs if f[0] != "."
        )
    elif os.path.isfile(path):
        if not path.endswith(SUFFIXES):
            raise ValueError(
                f"chat data file {path!r} has an unsupported suffix; valid: {', '.join(SUFFIXES)}"
            )
        files = [path]
    else:
        raise FileNotFoundError(
            f"chat data_path {path!r} does not exist; expected a .jsonl/.json/.parquet file, a "
            "directory or glob of them, tfds:NAME, or chatterbot/en|zh"
        )
    files = [f for f in files if f.endswith(SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"chat data_path {path!r} matches no .jsonl/.json/.parquet file")
    return files


def _rows_of_file(f: str) -> Iterator[tuple[Any, str]]:
    if f.endswith(".jsonl"):
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{f}:{lineno}"
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: malformed JSON line: {e}") from None
    elif f.endswith(".json"):
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: malformed JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("rows", [data]))
        if not isinstance(data, list):
            raise ValueError(f"{f}: expected a JSON list of rows")
        for i, row in enumerate(data):
            yield row, f"{f}[{i}]"
    else:
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(f).to_pylist()):
            yield row, f"{f} row {i}"


def read_dialogs(
    data_path: str, split: str = "train", data_dir: str | None = None
) -> list[list[dict[str, str]]]:
    """All dialogs of a chat `data_path` (see the module docstring) in a fixed order.

    Args:
      data_path: files, `tfds:NAME`, or `chatterbot/en|zh`.
      split: chatterbot and TFDS splits; local files have only "train".
      data_dir: TFDS data dir / chatterbot download dir.
    """
    dp = parse_data_path(data_path)
    if dp.scheme == "chatterbot":
        return chatterbot.dialogs(dp.name, split, data_dir)
    if dp.scheme == "tfds":
        builder = tfds_builder(dp.name, dp.version, data_dir=data_dir)
        if split.split("[", 1)[0] not in builder.info.splits:
            raise ValueError(
                f"{data_path} has no split {split!r}; its splits: {', '.join(builder.info.splits)}"
            )
        ds = builder.as_data_source(split=split)
        return [row_to_messages(dict(ds[i]), f"{data_path}[{split}][{i}]") for i in range(len(ds))]
    if split != "train":
        raise ValueError(
            f"split={split!r}: local chat files have one split, 'train'; give held-out "
            "dialogs with valid_data_path"
        )
    return [
        row_to_messages(row, where) for f in _files(data_path) for row, where in _rows_of_file(f)
    ]


# ----------------------------------------------------------------------------- dialog -> tokens
def render(
    tokenizer: Any, messages: list[dict[str, str]], train_on: str
) -> tuple[list[int], list[int]]:
    """(ids, mask): the single chat encoding of a dialog (the model's template, or the built-in
    Llama 3 format) and which ids are targets (`Tokenizer.encode_dialog_masked`).

    Raises:
      ValueError for an unknown `train_on`, or a template no mask can be cut from.
    """

    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; valid: {', '.join(TRAIN_ON)}")
    return tokenizer.encode_dialog_masked(messages, train_on)


@dataclasses.dataclass
class ChatStats:
    """What happened to the rows; logged by `build_examples`."""

    rows: int = 0
    examples: int = 0
    no_assistant: int = 0  # skipped
    truncated: int = 0  # cut to seq_len (truncation=right)
    dropped_long: int = 0  # longer than seq_len (truncation=drop), or cut to no target
    target_tokens: int = 0

    def report(self, what: str) -> str:
        return (
            f"{what}: {self.rows} dialogs -> {self.examples} examples "
            f"({self.target_tokens} target tokens); skipped {self.no_assistant} with no "
            f"assistant turn; {self.truncated} truncated, {self.dropped_long} dropped as longer "
            "than seq_len"
        )


def build_examples(
    dialogs: list[list[dict[str, str]]],
    tokenizer: Any,
    *,
    seq_len: int,
    train_on: str = "assistant",
    truncation: str = "right",
    what: str = "chat data",
) -> tuple[list[np.ndarray], list[np.ndarray], ChatStats]:
    """Renders and checks every dialog: (ids per example, mask per example, stats).

    Raises:
      ValueError when no example is left (every dialog too long, or none with an assistant).
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}; valid: {', '.join(TRUNCATION)}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; valid: {', '.join(TRAIN_ON)}")
    stats = ChatStats(rows=len(dialogs))
    all_ids, all_masks = [], []
    for messages in dialogs:
        if not any(m["role"] == "assistant" for m in messages):
            stats.no_assistant += 1
            continue
        ids, mask = render(tokenizer, messages, train_on)
        if len(ids) - 1 > seq_len:
            if truncation == "drop":
                stats.dropped_long += 1
                continue
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not any(mask[1:]):
                stats.dropped_long += 1
                continue
            stats.truncated += 1
        all_ids.append(np.asarray(ids, np.int32))
        all_masks.append(np.asarray(mask, np.int8))
        stats.examples += 1
        stats.target_tokens += int(sum(mask[1:]))
    # Anything skipped, cut or dropped is said on the console (a warning), not only in the log.
    lost = stats.no_assistant or stats.truncated or stats.dropped_long
    (log.warning if lost else log.info)("%s", stats.report(what))
    if not all_ids:
        raise ValueError(
            f"{what}: no example left to train on ({stats.report('of')}); "
            + (
                f"raise seq_len (now {seq_len})"
                + (" or use truncation=right" if truncation == "drop" else "")
                if stats.dropped_long
                else "every dialog needs an assistant turn"
            )
        )
    return all_ids, all_masks, stats


# ----------------------------------------------------------------------------- packing
@dataclasses.dataclass(frozen=True)
class _Spec:
    seq_len: int


class ChatPacker:
    """Rows of whole examples for any (epoch, slot); the `Packer` interface of `loader`.

    The layout (which examples share a row) is fixed by `seed`; only the row order changes per
    epoch, so every epoch has the same number of rows.
    """

    def __init__(
        self,
        ids: list[np.ndarray],
        masks: list[np.ndarray],
        seq_len: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.spec = _Spec(seq_len)
        self.pad_id = int(pad_id)
        self.seed, self.shuffle = int(seed), shuffle
        self._ids, self._masks = ids, masks
        n = len(ids)
        order = permutation(n, seed, 0, 2) if shuffle else np.arange(n)
        rows, cur, used = [], [], 0
        for k in order:
            units = len(ids[k]) - 1
            if cur and used + units > seq_len:
                rows.append(cur)
                cur, used = [], 0
            cur.append(int(k))
            used += units
        if cur:
            rows.append(cur)
        self._rows = rows
        self.rows_per_epoch = len(rows)
        self.num_documents = n
        self.num_tokens = int(sum(len(x) for x in ids))
        h = hashlib.sha256()
        for a, m in zip(ids, masks):
            h.update(a.tobytes())
            h.update(m.tobytes())
        self.content_hash = h.hexdigest()

    def rows(self, epochs: np.ndarray, slots: np.ndarray) -> dict[str, np.ndarray]:
        epochs, slots = np.asarray(epochs), np.asarray(slots)
        n, t = len(slots), self.spec.seq_len
        out = {
            "inputs": np.full((n, t), self.pad_id, np.int32),
            "targets": np.full((n, t), self.pad_id, np.int32),
            "segment_ids": np.zeros((n, t), np.int32),
            "positions": np.zeros((n, t), np.int32),
            "loss_mask": np.zeros((n, t), np.float32),
        }
        for r, (epoch, slot) in enumerate(zip(epochs, slots)):
            if slot < 0:
                continue
            if self.shuffle:
                slot = permutation(self.rows_per_epoch, self.seed, int(epoch), 1)[slot]
            pos = 0
            for seg, k in enumerate(self._rows[int(slot)], 1):
                ids, mask = self._ids[k], self._masks[k]
                m = len(ids) - 1
                sl = slice(pos, pos + m)
                out["inputs"][r, sl] = ids[:-1]
                out["targets"][r, sl] = ids[1:]
                out["segment_ids"][r, sl] = seg
                out["positions"][r, sl] = np.arange(m)
                out["loss_mask"][r, sl] = mask[1:]
                pos += m
        return out


def make_chat_iterators(
    data_path: str,
    tokenizer: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    mesh: Any,
    seed: int = 0,
    num_epochs: int | None = None,
    valid_data_path: str = "",
    train_split: str = "train",
    valid_split: str = "validation",
    data_dir: str | None = None,
    train_on: str = "assistant",
    truncation: str = "right",
    prefetch: int = 2,
    num_threads: int = 2,
) -> tuple[Any, Any | None, dict[str, ChatStats]]:
    """(train iterator, eval iterator or None, stats): the chat counterpart of the loaders.

    The eval iterator reads `valid_data_path` ("train" split), else the `valid_split` of a
    source that has one (chatterbot, TFDS); local files without `valid_data_path` give None.
    """

    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}; valid: {', '.join(TRUNCATION)}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; valid: {', '.join(TRAIN_ON)}")
    seq_len = loader._check_int("seq_len", seq_len, minimum=1)
    rows, sharding = loader._local_rows(
        mesh, ("data", "fsdp"), global_batch_size, seq_len, None, None
    )
    pad = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
    stats = {}

    def make(path: str, split: str, shuffle: bool, epochs: int | None, what: str):
        dialogs = read_dialogs(path, split, data_dir)
        ids, masks, st = build_examples(
            dialogs, tokenizer, seq_len=seq_len, train_on=train_on, truncation=truncation, what=what
        )
        stats[what] = st
        packer = ChatPacker(ids, masks, seq_len, pad, seed=seed, shuffle=shuffle)
        return loader._MakeBatch(packer, global_batch_size, rows, epochs, sharding), packer

    train_mb, packer = make(data_path, train_split, True, num_epochs, "train")
    config = {
        "corpus": packer.content_hash,
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "train_on": train_on,
        "truncation": truncation,
    }
    num_steps = None
    if num_epochs is not None:
        num_steps = math.ceil(num_epochs * packer.rows_per_epoch / global_batch_size)
    train_it = loader.TrainIterator(
        train_mb, num_steps=num_steps, config=config, prefetch=prefetch, num_threads=num_threads
    )
    eval_it = None
    if valid_data_path or parse_data_path(data_path).has_splits:
        path, split = (valid_data_path, "train") if valid_data_path else (data_path, valid_split)
        if valid_data_path and parse_data_path(valid_data_path).has_splits:
            split = valid_split
        if (
            parse_data_path(path).scheme == "tfds"
            and not valid_data_path
            and not _tfds_has(path, split, data_dir)
        ):
            log.warning("no validation: %s has no split %r (give valid_data_path)", path, split)
            return train_it, None, stats
        eval_mb, _ = make(path, split, False, 1, "validation")
        eval_it = loader.EvalIterator(eval_mb, prefetch=prefetch, num_threads=num_threads)
    return train_it, eval_it, stats


def _tfds_has(data_path: str, split: str, data_dir: str | None) -> bool:
    dp = parse_data_path(data_path)
    splits = tfds_builder(dp.name, dp.version, data_dir=data_dir).info.splits
    return split.split("[", 1)[0] in splits
