"""A corrupt batch for the trainer's NaN tests: no fault hook lives in the training step.

`poisoned_batch(at)` makes the batch of step `at` (the step from `at` to `at + 1`) carry a NaN
in its loss mask, as a corrupt data pipeline would; the step's finiteness guard must then skip
it (nan_policy=skip) or stop the run (abort) with nothing non-finite saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import pytest

from llama_jax.training import trainer


class _PoisonedData:
    """The trainer's train iterator, with a NaN in one step's loss mask."""

    def __init__(self, it: Any, at: int):
        self._it, self._at = it, at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._it, name)

    def __iter__(self) -> _PoisonedData:
        return self

    def __next__(self) -> dict[str, Any]:
        step = self._it.step
        batch = next(self._it)
        if step == self._at:
            batch = dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)
        return batch


@contextlib.contextmanager
def poisoned_batch(at: int) -> Iterator[None]:
    """While active, `trainer.train` reads a NaN in the loss mask of step `at`'s batch."""
    real = trainer.make_data

    def make_data(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        train_it, eval_it = real(*args, **kwargs)
        return _PoisonedData(train_it, at), eval_it

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "make_data", make_data)
        yield
