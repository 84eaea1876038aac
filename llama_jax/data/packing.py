"""Packing: tokenised documents -> rows of `seq_len` tokens, with no attention across documents.

The packing rule (one epoch):

1. Each document becomes ``[BOS] + ids + [EOS]`` (BOS and EOS each optional).
2. The documents are concatenated, in an order shuffled per epoch (deterministic in
   `seed` and the epoch), into one stream of N tokens.
3. The stream is cut every T = `seq_len` tokens into R = ceil(N / T) rows. Row r reads the
   T + 1 tokens ``stream[r*T : r*T + T + 1]``: the first T are its `inputs`, and
   ``targets[i]`` is the token after ``inputs[i]`` when both belong to the same document. The
   last row is padded.
4. The rows are visited in an order shuffled per epoch (so that a batch does not hold
   consecutive pieces of one long document).

A document longer than a row, or straddling a cut, is split into pieces at the cuts. Each piece
is its own segment: `segment_ids` number the pieces of a row 1, 2, 3, ... (0 is padding),
`positions` count from 0 at the start of each piece (so they restart at every document start
and stay below T), and attention masked by segment never crosses a document boundary. The
prediction across a cut (the last token of a piece to the first token of the same document's
next piece) is kept: the window reads one token past the row, so ``targets[T-1]`` can be it.

Hence, per epoch, every token of the corpus (with its BOS/EOS) appears exactly once in
`inputs` with a nonzero segment id, and every next-token prediction inside a document appears
exactly once with ``loss_mask == 1``; predictions across documents (EOS -> next BOS) and
padding have ``loss_mask == 0`` and ``targets == pad_id``.

Batch arrays, all [B, T]: ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32) and
``loss_mask`` (float32).

Shuffles use a splitmix64 hash of (seed, epoch, index) sorted with numpy, rather than a numpy
random Generator, so a checkpointed position means the same rows under any numpy version.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 (wrapping arithmetic)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def permutation(n: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """A permutation of range(n) determined by (seed, epoch, stream); int64 [n]."""
    key = np.array([seed & ((1 << 64) - 1)], dtype=_U64)
    for word in (epoch, stream):
        key = _mix(key ^ _U64(word & ((1 << 64) - 1)))
    # xor with a constant and _mix are bijections, so the sort keys are distinct.
    keys = _mix(np.arange(n, dtype=_U64) ^ key)
    return np.argsort(keys, kind="stable")


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """How rows are formed.

    Attributes:
      seq_len: T, tokens per row.
      bos_id: prepended to every document, or None.
      eos_id: appended to every document, or None.
      pad_id: fills `inputs` and `targets` where there is no token.
    """

    seq_len: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int


class Packer:
    """Packed rows of a tokenised corpus for any (epoch, slot); pure and thread-safe.

    Args:
      tokens: [num_tokens] all documents' ids concatenated (a memory map is fine).
      offsets: [num_documents + 1] document boundaries into `tokens`.
      spec: the row format.
      seed: shuffling seed.
      shuffle: shuffle documents and rows per epoch; False keeps corpus order (evaluation).
      doc_range: the [start, stop) documents to use (a split of a local corpus).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        spec: PackSpec,
        *,
        seed: int = 0,
        shuffle: bool = True,
        doc_range: tuple[int, int] | None = None,
    ) -> None:
        self.spec = spec
        self.seed = int(seed)
        self.shuffle = shuffle
        self._tokens = tokens
        self._has_bos = spec.bos_id is not None
        self._has_eos = spec.eos_id is not None
        start, stop = doc_range if doc_range is not None else (0, len(offsets) - 1)
        offsets = np.asarray(offsets, dtype=np.int64)
        starts, ends = offsets[start:stop], offsets[start + 1 : stop + 1]
        lengths = ends - starts + int(self._has_bos) + int(self._has_eos)
        keep = lengths > 0  # a document with no ids and no BOS/EOS adds nothing
        self._doc_start = starts[keep]
        self._lengths = lengths[keep]
        self.num_documents = int(keep.sum())
        self.num_tokens = int(self._lengths.sum())  # N, with BOS/EOS
        self.rows_per_epoch = math.ceil(self.num_tokens / spec.seq_len)  # R
        # A batch usually touches one or two epochs: keep a few layouts (per packer; thread-safe).
        self._layout = functools.lru_cache(maxsize=4)(self._compute_layout)

    def _compute_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order [D], stream start of each ordered document [D + 1], row order [R])."""
        d, r = self.num_documents, self.rows_per_epoch
        if self.shuffle:
            order = permutation(d, self.seed, epoch, 0)
            row_order = permutation(r, self.seed, epoch, 1)
        else:
            order, row_order = np.arange(d), np.arange(r)
        cum = np.zeros(d + 1, dtype=np.int64)
        np.cumsum(self._lengths[order], out=cum[1:])
        return order, cum, row_order

    def rows(self, epochs: np.ndarray, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at `slots` of the given epochs' row orders.

        Args:
          epochs: [n] epoch of each row.
          slots: [n] position in that epoch's row order, in [0, rows_per_epoch), or -1 for a
            padding row (all padding, `loss_mask` 0).

        Returns:
          The batch dict (see `BATCH_KEYS`), arrays [n, T].
        """
        epochs, slots = np.asarray(epochs), np.asarray(slots)
        n, t = len(slots), self.spec.seq_len
        out = {
            "inputs": np.full((n, t), self.spec.pad_id, np.int32),
            "targets": np.full((n, t), self.spec.pad_id, np.int32),
            "segment_ids": np.zeros((n, t), np.int32),
            "positions": np.zeros((n, t), np.int32),
            "loss_mask": np.zeros((n, t), np.float32),
        }
        live = slots >= 0
        for epoch in np.unique(epochs[live]):
            sel = live & (epochs == epoch)
            order, cum, row_order = self._layout(int(epoch))
            part = self._pack(order, cum, row_order[slots[sel]])
            for k, v in part.items():
                out[k][sel] = v
        return out

    def _pack(self, order: np.ndarray, cum: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        t, n_stream = self.spec.seq_len, self.num_tokens
        row_start = rows.astype(np.int64)[:, None] * t  # [n, 1]
        p = row_start + np.arange(t + 1)  # [n, T+1] stream positions of the window
        valid = p < n_stream
        p = np.minimum(p, n_stream - 1)
        j = np.searchsorted(cum, p, side="right") - 1  # [n, T+1] index into the order
        doc = order[j]
        start = cum[j]
        o = p - start  # offset inside the document (BOS included)
        is_bos = (o == 0) if self._has_bos else np.zeros_like(valid)
        is_eos = (o == self._lengths[doc] - 1) if self._has_eos else np.zeros_like(valid)
        body = valid & ~is_bos & ~is_eos
        if self._tokens.size:
            idx = np.where(body, self._doc_start[doc] + o - int(self._has_bos), 0)
            tok = np.asarray(self._tokens[idx], dtype=np.int32)
        else:
            tok = np.zeros(p.shape, np.int32)
        pad = self.spec.pad_id
        tok = np.where(body, tok, pad)
        if self._has_bos:
            tok = np.where(valid & is_bos, self.spec.bos_id, tok)
        if self._has_eos:
            tok = np.where(valid & is_eos, self.spec.eos_id, tok)

        v_in = valid[:, :t]
        same = valid[:, 1:] & (j[:, 1:] == j[:, :-1])  # next token is in the same document
        new_piece = np.ones((len(rows), t), bool)
        new_piece[:, 1:] = j[:, 1:t] != j[:, : t - 1]
        piece_start = np.maximum(start[:, :t], row_start)
        return {
            "inputs": tok[:, :t],
            "targets": np.where(same, tok[:, 1:], pad).astype(np.int32),
            "segment_ids": np.where(v_in, np.cumsum(new_piece, axis=1), 0).astype(np.int32),
            "positions": np.where(v_in, p[:, :t] - piece_start, 0).astype(np.int32),
            "loss_mask": same.astype(np.float32),
        }


__all__ = ["BATCH_KEYS", "PackSpec", "Packer", "permutation"]
