"""The trainer: one linear script from an experiment config to checkpoints in a run directory.

The same code runs on one CPU, on 8 fake devices, and on many hosts (`jax.distributed`):

  1. distributed init and mesh       5. one jitted train_step (explicit shardings, donation)
  2. checks that fail fast           6. resume from the newest committed checkpoint
  3. tokenizer (load or train)*      7. the loop: async metrics, eval, checkpoints, SIGTERM
  4. data iterators*                 8. final checkpoint and validation loss

(* in train_data.py)

The run directory is also a model directory (`config.json` + tokenizer file); its params are
those of the newest committed checkpoint, so `Llama3.from_pretrained(run_dir)` works at any
time during or after training.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import logging
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llama_jax.atomic import write_atomic
from llama_jax.data import parse_data_path
from llama_jax.data.builtin_models import resolve_model_path
from llama_jax.formats import checkpoint, finetune_run
from llama_jax.formats.load import load_any
from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig
from llama_jax.training import experiment, finetune, metrics, optim
from llama_jax.training.data import get_tokenizer, make_data
from llama_jax.training.step import base_shardings, init_state, jit_steps, make_tx

log = logging.getLogger("llama_jax.training.trainer")

NAN_POLICIES = ("abort", "skip")


class NonFiniteLossError(RuntimeError):
    """Raised (nan_policy=abort) when a step produced a non-finite loss or gradient."""


# ============================================================================ 1. distributed
def init_distributed(c: ml_collections.ConfigDict) -> None:
    """jax.distributed for multi-host: explicit coordinator flags, else auto-detected clusters.

    Must run before any other JAX call. CPU processes talk over gloo collectives.
    """
    if jax.distributed.is_initialized():
        return
    explicit = bool(c.coordinator_address)
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    if not (explicit or slurm or tpu_pod):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if c.num_processes <= 0 or c.process_id < 0:
            raise ValueError(
                "coordinator_address needs num_processes > 0 and process_id >= 0, got "
                f"{c.num_processes} and {c.process_id}"
            )
        jax.distributed.initialize(
            coordinator_address=c.coordinator_address,
            num_processes=c.num_processes,
            process_id=c.process_id,
        )
    else:
        jax.distributed.initialize()


def make_run_mesh(c: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    devices = jax.devices()
    if c.num_devices:
        if c.num_devices > len(devices):
            raise ValueError(
                f"num_devices={c.num_devices} requested but only {len(devices)} devices exist "
                f"({devices[0].platform})"
            )
        if jax.process_count() > 1 and c.num_devices != len(devices):
            raise ValueError("num_devices must be 0 (all) in a multi-process run")
        devices = devices[: c.num_devices]
    return sharding.make_mesh(tuple(c.mesh_shape), devices)


# ============================================================================ 2. checks
def check_step_config(c: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh) -> None:
    """The checks of the step's shapes against the mesh (no files read; plan.py uses them)."""
    sharding.check_model_fits_mesh(model_cfg, mesh)
    if c.grad_accum_steps < 1 or c.batch_size % c.grad_accum_steps:
        raise ValueError(
            f"batch_size={c.batch_size} must be a multiple of grad_accum_steps={c.grad_accum_steps}"
        )
    sharding.check_batch_fits_mesh(c.batch_size // c.grad_accum_steps, mesh)
    if c.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"seq_len={c.seq_len} exceeds the model's max_seq_len ({model_cfg.max_seq_len})"
        )


def check_config(
    c: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh, task_eval: Any = None
) -> None:
    """Everything a user can get wrong, before any expensive work."""
    check_step_config(c, model_cfg, mesh)
    if c.get("eval_tasks"):
        if task_eval is None:
            raise ValueError(
                f"eval_tasks={c.eval_tasks!r} needs a task evaluator: run the experiment with "
                "`llama3 train` (or pass task_eval=llama_jax.eval.runner.TrainerEval to train)"
            )
        task_eval.check_names(c.eval_tasks)  # ValueError naming the valid built-in tasks
    if c.nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={c.nan_policy!r}; valid: {NAN_POLICIES}")
    if c.schedule not in optim.SCHEDULES:
        raise ValueError(f"schedule={c.schedule!r}; valid: {optim.SCHEDULES}")
    if c.num_steps <= 0 and c.num_epochs <= 0:
        raise ValueError("set num_steps > 0, or num_steps = 0 and num_epochs > 0")
    for name in ("data_path", "valid_data_path"):
        dp = parse_data_path(c[name]) if c[name] else None
        if dp is not None and dp.scheme == "files" and not glob.glob(dp.path):
            value = c[name]
            raise FileNotFoundError(f"{name}={value!r} does not exist")
    if c.init_from:  # a built-in model name ("smollm2-135m-instruct") -> its cached file
        c.init_from = resolve_model_path(c.init_from, "init_from")
    if c.init_from and not os.path.exists(c.init_from):
        raise FileNotFoundError(
            f"init_from={c.init_from!r} does not exist (a model directory, a GGUF file or a "
            "built-in model name)"
        )
    if finetune.lora_config(c) is not None and not c.init_from:
        raise ValueError("lora.rank > 0 trains adapters on a base: set init_from (--init_from)")
    finetune.check_run_dir(c)  # first: the base's own directory as run_dir is not read as one
    checkpoint.check_run_dir(c.run_dir, model_cfg)


# ============================================================================ the trainer
def train(c: ml_collections.ConfigDict, task_eval: Any = None) -> dict[str, Any]:
    """Runs the experiment `c`; returns the final metrics (validation loss among them).

    Args:
      c: the experiment config (training/experiment.py's schema).
      task_eval: what evaluates `c.eval_tasks` on the live params: a class with a static
        `check_names(names)` (raises on unknown tasks, before anything is written) and a
        constructor `(names, model_cfg, mesh, tokenizer, limit=...)` returning a callable
        `params -> {metric: value}`. `llama3 train` passes `eval.runner.TrainerEval`; the
        trainer itself knows nothing of evaluation (a lower layer than eval).
    """
    metrics.setup_logging()
    c = ml_collections.ConfigDict(c)
    experiment.check_ranges(c)
    # SIGTERM from here on saves and exits 0, the same before the loop as in it.
    stop = _StopSignal()
    try:
        return _train(c, stop, task_eval)
    finally:
        stop.restore()


def _train(c: ml_collections.ConfigDict, stop: _StopSignal, task_eval: Any) -> dict[str, Any]:
    init_distributed(c)
    mesh = make_run_mesh(c)
    model_cfg = experiment.model_config(c)
    check_config(c, model_cfg, mesh, task_eval)
    is_main = jax.process_index() == 0
    rules = sharding.LOGICAL_RULES
    os.makedirs(c.run_dir, exist_ok=True)  # every check has passed: the first write
    name = "train.log" if is_main else f"train.{jax.process_index()}.log"
    with metrics.log_to_file(os.path.join(c.run_dir, name)):
        return _run(c, stop, mesh, model_cfg, is_main, rules, task_eval)


def _run(c, stop, mesh, model_cfg: ModelConfig, is_main: bool, rules, task_eval) -> dict[str, Any]:
    lora_cfg = finetune.lora_config(c)  # None: every param is trained

    # ------------------------------------------------------------------ 3-4. tokenizer, data
    tokenizer = get_tokenizer(c)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        if c.init_from:  # the base's vocabulary is fixed
            raise ValueError(finetune.vocab_hint(c, tokenizer.vocab_size, model_cfg.vocab_size))
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
            f"{model_cfg.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}"
        )
    train_it, eval_it = make_data(c, tokenizer, mesh, model_cfg)
    num_steps = c.num_steps if c.num_steps > 0 else train_it.num_steps
    base_params = None
    if c.init_from:  # read now: a base that does not fit is an error before compiling
        base_params, record = _read_base(c.init_from, model_cfg)
        finetune.check_resume(c.run_dir, record)
        if is_main:
            finetune_run.write_record(c.run_dir, record, lora_cfg)
    if is_main:
        _write_run_files(c, model_cfg, tokenizer)

    # ------------------------------------------------------------------ 5. state and step
    tx, schedule = make_tx(c, num_steps)
    abstract = jax.eval_shape(functools.partial(init_state, model_cfg, tx, c.seed, lora_cfg))
    state_shardings = sharding.logical_to_sharding(abstract, mesh, rules)
    # The frozen base under LoRA: an argument of every step, never donated or checkpointed.
    base, base_sharding = {}, {}
    if lora_cfg is not None:
        base_sharding, _ = base_shardings(model_cfg, mesh, c.base_dtype or model_cfg.param_dtype)
        dt = jnp.dtype(c.base_dtype or model_cfg.param_dtype)
        base = jax.device_put(jax.tree.map(lambda a: np.asarray(a, dt), base_params), base_sharding)
        base_params = None
    train_step, eval_step = jit_steps(
        model_cfg, tx, schedule, c, lora_cfg, mesh, state_shardings, base_sharding
    )

    # ------------------------------------------------------------------ 6. resume or init
    ckpt = checkpoint.TrainCheckpointer(
        os.path.join(c.run_dir, "checkpoints"),
        keep=c.keep_checkpoints,
        async_save=c.async_checkpointing,
    )
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.unbox(abstract),
        state_shardings,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        restored = ckpt.restore_latest(target)
        if restored is not None:
            state, data_state = restored
            train_it.set_state(data_state)
            log.info("resumed from step %d", int(state["step"]))
        else:
            state = jax.jit(
                lambda: nn.unbox(init_state(model_cfg, tx, c.seed, lora_cfg)),
                out_shardings=state_shardings,
            )()
            if c.init_from and lora_cfg is None:
                state["params"] = _place_init_params(base_params, model_cfg, state_shardings)
    base_params = None
    start_step = int(state["step"])

    # ------------------------------------------------------------------ 7. the loop
    tokens_per_step = c.batch_size * c.seq_len
    flops_per_token = model_cfg.flops_per_token(c.seq_len)
    # CPU "devices" of one process share its cores (and one matmul already uses them all):
    # the peak counts once per process there, once per device on accelerators. A CPU has no
    # known peak: MFU is n/a there unless peak_flops is configured.
    cpu = mesh.devices.flat[0].platform == "cpu"
    peak = c.peak_flops or (0.0 if cpu else metrics.measure_peak_flops())
    units = jax.process_count() if cpu else mesh.size
    if peak:
        log.info(
            "MFU is model FLOPs/s over %s %.0f GFLOP/s x %d %s",
            "the configured peak_flops" if c.peak_flops else "a measured float32 matmul peak of",
            peak / 1e9,
            units,
            "processes (CPU devices share cores)" if cpu else "devices",
        )
    else:
        log.info("MFU: n/a on CPU (no known peak; set --config.peak_flops to report one)")
    writer = metrics.MetricsWriter(c.run_dir, c.tensorboard) if is_main else None
    pending: collections.deque = collections.deque()
    window: list[dict] = []
    t_window = time.perf_counter()
    bar = metrics.progress_bar(c, start_step, num_steps) if is_main else None
    final: dict[str, Any] = {}
    step = start_step
    aborted = None

    def drain(all_: bool = False):
        """Fetches metrics of finished steps (all but the newest unless all_)."""
        nonlocal aborted
        while pending and (all_ or len(pending) > 1):
            s, m = pending.popleft()
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            window.append(m)
            if not m["finite"]:
                log.warning("step %d: non-finite loss or gradient (%s)", s, c.nan_policy)
                if writer:
                    writer.write(s, {"nonfinite_step": 1.0, "loss": m["loss"]})
                if c.nan_policy == "abort" and aborted is None:
                    aborted = s

    builtin_eval = None
    if c.get("eval_tasks"):
        builtin_eval = task_eval(
            c.eval_tasks, model_cfg, mesh, tokenizer, limit=c.get("eval_limit", 0)
        )

    def run_eval(at_step: int) -> dict[str, float]:
        if eval_it is None:
            out = builtin_eval(state["params"]) if builtin_eval is not None else {}
            if writer and out:
                writer.write(at_step, out)
            return out
        total = jnp.zeros(()), jnp.zeros(())
        for i, batch in enumerate(eval_it):
            if c.eval_batches and i >= c.eval_batches:
                break
            total = jax.tree.map(jnp.add, total, eval_step(state["params"], batch, base))
        nll, n = (float(x) for x in jax.device_get(total))
        loss = nll / max(n, 1.0)
        out = {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)), "valid_tokens": n}
        if builtin_eval is not None:  # eval_tasks: built-in tasks on the live params
            out.update(builtin_eval(state["params"]))
        if writer:
            writer.write(at_step, out)
        log.info(
            "step %d: validation loss %.4f, perplexity %.2f", at_step, loss, out["valid_perplexity"]
        )
        return out

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        try:
            while step < num_steps and not stop.requested:
                batch = next(train_it)
                state, step_metrics = train_step(state, batch, base)
                pending.append((step, step_metrics))
                step += 1
                drain()
                if aborted is not None:
                    break
                if step % c.log_every == 0 or step == num_steps:
                    drain(all_=True)
                    now = time.perf_counter()
                    row = metrics.summarise(
                        window, now - t_window, tokens_per_step, flops_per_token, peak * units
                    )
                    window, t_window = [], now
                    if writer and row:
                        writer.write(step, row)
                    if bar is not None and row:
                        bar.set_postfix(
                            loss=f"{row['loss']:.3f}",
                            tok_s=f"{row['tokens_per_s']:.0f}",
                            mfu="n/a" if row["mfu"] is None else f"{row['mfu']:.1%}",
                            refresh=False,
                        )
                if bar is not None:
                    bar.update(1)
                if aborted is not None:
                    break
                if c.eval_every and step % c.eval_every == 0 and step < num_steps:
                    final.update(run_eval(step))
                if c.checkpoint_every and step % c.checkpoint_every == 0 and step < num_steps:
                    drain(all_=True)  # never checkpoint past a step not yet known finite
                    if aborted is not None:
                        break
                    ckpt.save(step, state, train_it.get_state(), c.to_dict())
                if step == c.debug_stop_after:
                    break
            if stop.requested or step == c.debug_stop_after:
                log.info(
                    "stopping at step %d (%s): saving",
                    step,
                    "SIGTERM" if stop.requested else "debug_stop_after",
                )
            drain(all_=True)
            if aborted is not None:
                ckpt.wait()
                intact = [s for s in checkpoint.committed_steps(ckpt.directory) if s <= aborted]
                where = (
                    f"the newest checkpoint, step {intact[-1]}, is intact and a rerun resumes "
                    "from it"
                    if intact
                    else "no checkpoint was written; a rerun starts afresh"
                )
                raise NonFiniteLossError(
                    f"the step from {aborted} to {aborted + 1} gave a non-finite loss, gradient "
                    f"or update (nan_policy=abort); nothing after step {aborted} was saved; "
                    f"{where}"
                )
            ckpt.save(step, state, train_it.get_state(), c.to_dict())
            if step >= num_steps:
                final.update(run_eval(step))
        except OSError as e:  # metrics, logs or a checkpoint's own files on a full disk
            if not checkpoint.is_disk_full(e):
                raise
            with contextlib.suppress(Exception):
                ckpt.wait()
            intact = ckpt.newest_intact()
            prev = (
                f"the newest intact checkpoint is step {intact} and a rerun resumes from it"
                if intact is not None
                else "no checkpoint was written; a rerun starts afresh"
            )
            raise checkpoint.CheckpointError(
                f"No space left on device at step {step} (writing "
                f"{getattr(e, 'filename', None) or c.run_dir}); {prev}; free some space (or "
                "move --model_path) and rerun"
            ) from e
        finally:
            ckpt.wait()
            if bar is not None:
                bar.close()
            train_it.close()
            if writer:
                writer.close()
    final["step"] = step
    if window:
        final["loss"] = window[-1]["loss"]
    return final


# ============================================================================ helpers
def _read_base(path: str, model_cfg: ModelConfig) -> tuple[Any, dict]:
    """(numpy params, finetune record) of the init_from model, checked against model_cfg."""
    src_cfg, params = load_any(path)
    diff = src_cfg.architecture_diff(model_cfg)
    if diff:
        raise ValueError(f"init_from={path} is a different architecture (there, here): {diff}")
    return params, finetune_run.base_record(path, src_cfg, params)


def _place_init_params(params: Any, model_cfg: ModelConfig, state_shardings) -> Any:
    dt = jnp.dtype(model_cfg.param_dtype)
    params = jax.tree.map(lambda a: np.asarray(a).astype(dt), params)
    return jax.device_put(params, state_shardings["params"])


def _write_run_files(c, model_cfg: ModelConfig, tokenizer) -> None:
    """The run directory is a model directory: config.json and the tokenizer file."""
    write_atomic(os.path.join(c.run_dir, "config.json"), model_cfg.to_json())
    write_atomic(os.path.join(c.run_dir, "experiment.json"), c.to_json_best_effort(indent=2))
    tokenizer.save(c.run_dir)


class _StopSignal:
    """SIGTERM (preemption) sets a flag; the loop saves at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = None
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
