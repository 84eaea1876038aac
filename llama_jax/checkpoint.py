"""Orbax checkpoints: the params of a model directory, and (trainer) the run's training state.

A model directory is `config.json` + the tokenizer file + `params/` (an orbax checkpoint of
the params tree). Orbax writes into a temporary directory and renames it on commit, so a
crash never leaves a half-written `params/` that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


def save_params(path: str, params: Any) -> None:
    """Writes a params tree of host numpy arrays as an orbax checkpoint at `path`.

    Synchronous, without orbax's defensive copy of host arrays (we do not touch them while it
    writes) and without chunk compression (whose output tensorstore buffers until commit; model
    weights hardly compress anyway), so converting a checkpoint peaks at about one copy of the
    params.
    """
    path = os.path.abspath(path)
    params = jax.tree.map(np.asarray, params)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    ckptr = ocp.Checkpointer(handler)
    ckptr.save(path, args=ocp.args.PyTreeSave(params))


@contextlib.contextmanager
def _quiet_orbax_warnings():
    """A training checkpoint's item directory has no step metadata file of its own; orbax logs
    a warning about it on every read that means nothing here."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def params_metadata(path: str) -> Any:
    """Tree of orbax ArrayMetadata (shape, dtype) without reading any tensor."""
    with _quiet_orbax_warnings():
        return ocp.StandardCheckpointer().metadata(os.path.abspath(path)).item_metadata.tree


def load_params(
    path: str, target: Any | None = None, subtree: str | tuple[str, ...] | None = None
) -> Any:
    """Restores params from `path`.

    Args:
      path: an orbax checkpoint directory (a model directory's `params/`, or a training
        checkpoint's `state/` with subtree="params").
      target: optional tree of `jax.ShapeDtypeStruct` with shardings (restores each shard on
        its device, in the target dtype); None restores host numpy arrays as stored.
      subtree: restore only this key (or nested key path) of the stored tree.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params checkpoint at {path}")
    meta = params_metadata(path)
    keys = (subtree,) if isinstance(subtree, str) else tuple(subtree or ())

    def nest(leaf: Any) -> Any:  # {k0: {k1: ... leaf}}: the subtree at its place in the tree
        for k in reversed(keys):
            leaf = {k: leaf}
        return leaf

    for k in keys:
        meta = meta[k]
    meta = nest(meta)
    if target is None:
        restore_args = jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta, is_leaf=_is_array_meta
        )
    else:
        target = nest(target)
        restore_args = jax.tree.map(
            lambda t: ocp.ArrayRestoreArgs(
                sharding=t.sharding, global_shape=t.shape, dtype=t.dtype
            ),
            target,
        )
    item = jax.tree.map(lambda m: 0, restore_args, is_leaf=lambda x: isinstance(x, ocp.RestoreArgs))
    with _quiet_orbax_warnings():
        out = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=bool(keys)
            ),
        )
    for k in keys:
        out = out[k]
    return out


class LazyParams:
    """A params checkpoint read one leaf at a time: `lazy["layers"]["mlp"]["w_up"]` restores
    just that array, so exporting a model holds about one copy plus one leaf in flight."""

    def __init__(self, path: str, keys: tuple[str, ...] = (), meta: Any = None):
        self._path, self._keys = path, keys
        self._meta = params_metadata(path) if meta is None else meta

    def __getitem__(self, key: str) -> Any:
        child = self._meta[key]
        if isinstance(child, dict):
            return LazyParams(self._path, (*self._keys, key), child)
        return load_params(self._path, subtree=(*self._keys, key))

    def __contains__(self, key: str) -> bool:
        return key in self._meta


def _is_array_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


# ----------------------------------------------------------------------------- training state
_ITEMS = ("state", "data", "config")


def committed_steps(directory: str) -> list[int]:
    """Steps whose checkpoint orbax committed completely (rename done, every item present)."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        if name.isdigit() and _is_committed(os.path.join(directory, name)):
            steps.append(int(name))
    return sorted(steps)


def _is_committed(step_dir: str) -> bool:
    meta = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    if not os.path.isfile(meta):
        return False
    try:
        with open(meta) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if not info.get("commit_timestamp_nsecs"):
        return False
    return all(os.path.isdir(os.path.join(step_dir, item)) for item in _ITEMS)


def quarantine_uncommitted(directory: str) -> list[str]:
    """Moves step directories that are not committed aside (never deletes them).

    A half-written directory named like a step (a crash outside orbax's atomic rename, or a
    copy interrupted by hand) would otherwise be taken for a checkpoint by orbax.
    """
    moved = []
    if not os.path.isdir(directory):
        return moved
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.isdigit() and not _is_committed(path):
            dest = os.path.join(directory, f"{name}.uncommitted-{int(time.time())}")
            os.replace(path, dest)
            moved.append(dest)
    return moved


class TrainCheckpointer:
    """Orbax CheckpointManager over `<run_dir>/checkpoints/<step>/{state,data,config}`.

    Saves are asynchronous (orbax writes a temporary directory and renames it on commit);
    `restore_latest` takes the newest committed step onto any mesh (the target's shardings).
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        if jax.process_index() == 0:
            for path in quarantine_uncommitted(self.directory):
                logging.getLogger("llama_jax.checkpoint").warning(
                    "ignoring uncommitted checkpoint directory (moved to %s)", path
                )
        _sync("quarantine")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._last_saved: int | None = None

    def latest_step(self) -> int | None:
        steps = committed_steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        if step == self._last_saved or step in committed_steps(self.directory):
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
        )
        self._last_saved = step

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """(state, data_state) of the newest committed step, or None for a fresh run."""
        step = self.latest_step()
        if step is None:
            return None
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
