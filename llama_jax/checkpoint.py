"""Orbax checkpoints: the params of a model directory, and (trainer) the run's training state.

A model directory is `config.json` + the tokenizer file + `params/` (an orbax checkpoint of
the params tree). Orbax writes into a temporary directory and renames it on commit, so a
crash never leaves a half-written `params/` that looks complete.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


def save_params(path: str, params: Any) -> None:
    """Writes a params tree (numpy or jax arrays) as an orbax checkpoint at `path`."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params)
    ckptr.wait_until_finished()


def params_metadata(path: str) -> Any:
    """Tree of orbax ArrayMetadata (shape, dtype) without reading any tensor."""
    return ocp.StandardCheckpointer().metadata(os.path.abspath(path)).item_metadata.tree


def load_params(path: str, target: Any | None = None) -> Any:
    """Restores params from `path`.

    Args:
      path: the orbax checkpoint directory (a model directory's `params/`).
      target: optional tree of `jax.ShapeDtypeStruct` with shardings (restores each shard on
        its device, in the target dtype); None restores host numpy arrays as stored.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params checkpoint at {path}")
    if target is None:
        meta = params_metadata(path)
        restore_args = jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta, is_leaf=_is_array_meta
        )
        return ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    return ocp.StandardCheckpointer().restore(path, target)


def _is_array_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")
