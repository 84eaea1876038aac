"""Orbax checkpoints: the params of a model directory, and (trainer) the run's training state.

A model directory is `config.json` + the tokenizer file + `params/` (an orbax checkpoint of
the params tree). Orbax writes into a temporary directory and renames it on commit, so a
crash never leaves a half-written `params/` that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_jax.model.config import ModelConfig

log = logging.getLogger("llama_jax.formats.checkpoint")

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
_ITEMS = ("state", "data", "config")  # every committed step has these
VERIFY_ITEM = "verify"  # fingerprint + finiteness, written since format 1 (older steps lack it)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be restored."""


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


def read_json_item(step_dir: str, item: str) -> Any:
    """A JSON item (`config`, `data`, `verify`) of a committed step, read without orbax."""
    with _quiet_orbax_warnings():
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
            os.path.abspath(os.path.join(step_dir, item))
        )


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
            moved.append(_move_aside(path, "uncommitted"))
    return moved


def _move_aside(path: str, why: str) -> str:
    dest = f"{path}.{why}-{int(time.time())}"
    os.replace(path, dest)
    return dest


# The fingerprint: per leaf, the wrapping uint32 sum of its raw bits times odd position weights.
# Any single flipped bit changes it (2^k times an odd number is never 0 mod 2^32), and so do
# swapped elements; it is computed on device, sharded like the state, and costs one read.
def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _leaf_finite(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.bool_(True)
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _fingerprints(tree: Any) -> tuple[list, jax.Array]:
    leaves = jax.tree.leaves(tree)
    finite = jnp.all(jnp.stack([_leaf_finite(x) for x in leaves]))
    return [_leaf_fingerprint(x) for x in leaves], finite


def state_fingerprint(state: Any) -> dict[str, Any]:
    """{"finite": bool, "leaves": {path: uint32 fingerprint}} of a (possibly sharded) tree."""
    sums, finite = jax.device_get(_fingerprints(state))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return {"format": 1, "finite": bool(finite), "leaves": dict(zip(paths, map(int, sums)))}


def data_digest(data_state: Any) -> str:
    """sha256 of the data-loader state as canonical JSON: the verification record holds it, so
    an edited data position (resuming from the wrong place in the data) is detected."""
    text = json.dumps(data_state, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def verification_problem(state: Any, recorded: dict | None, data_state: Any = None) -> str | None:
    """Why a restored state cannot be trusted (None: it can).

    Only the leaves of `state` are compared, so a params subtree (`{"params": ...}`) verifies
    against the whole train state's record; `data_state` is compared when given.
    """
    now = state_fingerprint(state)
    if not now["finite"]:
        return "holds non-finite values"
    if recorded is None:  # written before fingerprints existed: finiteness is all we know
        return None
    bad = [
        p
        for p, v in now["leaves"].items()
        if p in recorded["leaves"] and recorded["leaves"][p] != v
    ]
    if bad:
        return (
            f"does not match the fingerprint written at save ({len(bad)} arrays differ, "
            f"e.g. {bad[0]})"
        )
    missing = [p for p in now["leaves"] if p not in recorded["leaves"]]
    if missing:
        return f"has arrays its fingerprint does not list (e.g. {missing[0]})"
    digest = recorded.get("data")
    if data_state is not None and digest is not None and digest != data_digest(data_state):
        return "has a data-loader state that does not match the fingerprint written at save"
    return None


def expects_verify_record(step_dir: str) -> bool:
    """Whether the step was saved with a verification record (format 2 says so in orbax's
    step metadata), so a missing `verify/` item means it was deleted, not never written."""
    try:
        with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return bool((meta.get("custom_metadata") or {}).get("verify_record"))


def read_verify_record(step_dir: str) -> tuple[dict | None, str | None]:
    """(record, problem): the step's verification record, or why it cannot be trusted. A step
    without one that never promised one (saved before fingerprints existed) gives (None, None):
    the caller checks finiteness and warns."""
    if not os.path.isdir(os.path.join(step_dir, VERIFY_ITEM)):
        if expects_verify_record(step_dir):
            return None, "has lost its verification record (verify/ was deleted)"
        return None, None
    try:
        return read_json_item(step_dir, VERIFY_ITEM), None
    except Exception as e:  # a truncated or edited record: orbax raises anything
        return None, f"has an unreadable verification record ({type(e).__name__})"


def load_verified_params(checkpoints_dir: str, below: int | None = None) -> tuple[int, Any]:
    """(step, numpy params) of the newest committed training checkpoint that verifies, as
    resume does: readable, finite, equal to the fingerprint written at save. Newer steps that
    fail are named in a warning and skipped (never moved: a reader may not own the run).

    Raises:
      CheckpointError: no committed step (below `below`, if given) verifies (each one's
        problem is listed).
    """
    steps = [s for s in committed_steps(checkpoints_dir) if below is None or s < below]
    failed: list[tuple[int, str]] = []
    for step in reversed(steps):
        step_dir = os.path.join(checkpoints_dir, str(step))
        recorded, problem = read_verify_record(step_dir)
        params = None
        if problem is None:
            try:
                params = load_params(os.path.join(step_dir, "state"), subtree="params")
            except Exception as e:  # truncated, deleted or unparsable files
                problem = f"is unreadable ({type(e).__name__}: {_first_line(e)})"
        if problem is None:
            problem = verification_problem({"params": params}, recorded)
        if problem is None:
            if recorded is None:
                log.warning(
                    "checkpoint step %d in %s has no verification record (saved before "
                    "fingerprints): only its finiteness was checked",
                    step,
                    checkpoints_dir,
                )
            if failed:
                log.warning(
                    "checkpoint %s in %s; loading step %d instead",
                    "; ".join(f"step {s} {p}" for s, p in failed),
                    checkpoints_dir,
                    step,
                )
            return step, params
        failed.append((step, problem))
    listing = "; ".join(f"step {s} {p}" for s, p in failed) or "no committed step"
    raise CheckpointError(
        f"no checkpoint in {checkpoints_dir} can be loaded ({listing}); retrain, or restore the "
        "run directory from a copy"
    )


def is_disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class TrainCheckpointer:
    """Orbax CheckpointManager over `<run_dir>/checkpoints/<step>/{state,data,config,verify}`.

    Saves are asynchronous (orbax writes a temporary directory and renames it on commit), each
    with the fingerprint of the state it holds; `restore_latest` takes the newest committed
    step that verifies (readable, finite, fingerprint equal) onto any mesh, moving aside the
    newer ones that do not. Only finite states are ever saved (the trainer guarantees it), so
    keep-K rotation only ever deletes checkpoints older than K verified ones.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        if jax.process_index() == 0:
            for path in quarantine_uncommitted(self.directory):
                log.warning("ignoring uncommitted checkpoint directory (moved to %s)", path)
        _sync("quarantine")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(
                f"cannot open the checkpoint directory {self.directory} "
                f"({type(e).__name__}: {_first_line(e)}); make it writable or use another "
                "--model_path"
            ) from e
        self._last_saved: int | None = None
        self._in_flight: int | None = None
        self._failed = False  # a save failed: its orbax threads will never finish

    def latest_step(self) -> int | None:
        steps = committed_steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        if step == self._last_saved or step in committed_steps(self.directory):
            return
        if self._failed:
            raise CheckpointError(f"a checkpoint write to {self.directory} failed earlier")
        verify = {**state_fingerprint(state), "format": 2, "data": data_digest(data_state)}
        if not verify["finite"]:  # the trainer never gets here; a last line of defence
            raise CheckpointError(f"refusing to save step {step}: the state is not finite")
        with self._disk_errors(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config),
                    verify=ocp.args.JsonSave(verify),
                ),
                custom_metadata={"verify_record": 2},
            )
        self._last_saved = self._in_flight = step

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """(state, data_state) of the newest committed step that verifies, or None for a fresh
        run. Steps that fail (unreadable, non-finite, fingerprint mismatch) are logged in one
        line each and, once an older one verifies, moved aside as `<step>.corrupt-<time>`."""
        steps = committed_steps(self.directory)
        failed: list[tuple[int, str]] = []
        for i, step in enumerate(reversed(steps)):
            problem, out = self._try_restore(step, target)
            older = steps[-i - 2] if i + 1 < len(steps) else None
            if problem is None:
                if failed and jax.process_index() == 0:
                    for bad, _ in failed:
                        _move_aside(os.path.join(self.directory, str(bad)), "corrupt")
                if failed:
                    _sync("corrupt-checkpoints")
                    self._manager.reload()
                return out
            failed.append((step, problem))
            then = f"falling back to step {older}" if older is not None else "no older checkpoint"
            log.error("checkpoint step %d %s; %s", step, problem, then)
        if failed:
            listing = "; ".join(f"step {s} {p}" for s, p in failed)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored ({listing}); move the "
                "directory aside to start from scratch"
            )
        return None

    def _try_restore(self, step: int, target: Any) -> tuple[str | None, Any]:
        step_dir = os.path.join(self.directory, str(step))
        recorded, problem = read_verify_record(step_dir)
        if problem is not None:
            return problem, None
        args = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        try:
            with _quiet_orbax_warnings():
                out = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # truncated, deleted or unparsable files: orbax raises anything
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return f"is unreadable ({type(e).__name__}: {first})", None
        problem = verification_problem(out["state"], recorded, out["data"])
        if problem is None and recorded is None:
            log.warning(
                "checkpoint step %d has no verification record (saved before fingerprints): "
                "only its finiteness was checked",
                step,
            )
        return problem, (out["state"], out["data"])

    def wait(self) -> None:
        if self._failed:  # orbax's threads of the failed save never finish: do not wait on them
            return
        with self._disk_errors(self._in_flight):
            self._manager.wait_until_finished()
        self._in_flight = None

    def newest_intact(self, below: int | None = None) -> int | None:
        """The newest committed step (below `below`) whose params verify: what a rerun
        resumes from. Read back, because on a full disk orbax can commit a step whose array
        writes failed (its tasks' errors go unretrieved), so "committed" is not "intact"."""
        try:
            return load_verified_params(self.directory, below=below)[0]
        except CheckpointError:
            return None

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None):
        """Any failed write becomes one CheckpointError naming the step that failed (an async
        save's failure surfaces at the next save or wait, so it may be an earlier step than
        the one being saved), the cause, and the checkpoint a rerun resumes from."""
        try:
            yield
        except Exception as e:
            self._failed = True
            failed = step
            if self._in_flight is not None and self._in_flight not in committed_steps(
                self.directory
            ):
                failed = self._in_flight
            intact = self.newest_intact(below=failed)
            prev = (
                f"the newest intact checkpoint is step {intact} and a rerun resumes from it"
                if intact is not None
                else "no checkpoint was written; a rerun starts afresh"
            )
            if is_disk_full(e):
                raise CheckpointError(
                    f"No space left on device while saving step {failed} to {self.directory}; "
                    f"{prev}; free some space (or move --model_path) and rerun"
                ) from e
            cause = _root_cause(e)
            raise CheckpointError(
                f"cannot write checkpoint step {failed} to {self.directory} "
                f"({type(cause).__name__}: {_first_line(cause)}); {prev}; make the directory "
                "writable (check its permissions and `lsattr -d`) or use another --model_path"
            ) from e


def _root_cause(e: BaseException) -> BaseException:
    """The innermost OSError in an exception chain (orbax wraps its workers' errors)."""
    found = e
    while e is not None:
        if isinstance(e, OSError):
            found = e
        e = e.__cause__ or e.__context__
    return found


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_run_dir(run_dir: str, model_cfg) -> None:
    """The run directory must be writable and, if it holds a model or checkpoints already, of
    the same model: its checkpoints' own stored config is what is read, so a missing or
    edited config.json cannot hide another model. Writes nothing."""
    parent = os.path.abspath(run_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {run_dir!r} is not writable ({parent} is not)")
    found = []
    steps = committed_steps(os.path.join(run_dir, "checkpoints"))
    if steps:
        step_dir = os.path.join(run_dir, "checkpoints", str(steps[-1]))
        with contextlib.suppress(Exception):  # unreadable: restore reports it, step by step
            stored = read_json_item(step_dir, "config")["model"]
            found.append((f"its checkpoint of step {steps[-1]}", ModelConfig(**stored)))
    existing = os.path.join(run_dir, "config.json")
    if os.path.isfile(existing):
        with open(existing) as f:
            found.append(("its config.json", ModelConfig.from_dict(json.load(f))))
    for where, old in found:
        diff = old.architecture_diff(model_cfg)
        if diff:
            raise ValueError(
                f"run directory {run_dir} holds a different model ({where}; field: (there, "
                f"here)): {diff}; use a new run_dir"
            )
