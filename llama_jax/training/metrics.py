"""Training metrics: tokens/s and MFU, metrics.jsonl, TensorBoard, the progress bar, and the
run's console and log-file handlers.

MFU = tokens/s x FLOPs/token / (peak FLOP/s per device x devices), with FLOPs/token from
`ModelConfig.flops_per_token` (6 x matmul params + 12 x L x T x N x H; causal attention not
halved) and the peak measured by `measure_peak_flops` unless configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm


def measure_peak_flops(seconds: float = 1.0, n: int = 2048) -> float:
    """float32 matmul FLOP/s of one device (the MFU denominator when peak_flops is 0): the
    fastest of repeated n x n products over about `seconds` (at least 3), so a moment of
    load at start does not lower it. n = 2048: a 1024 x 1024 product runs well below a CPU's
    large-matmul rate, which put the demo's MFU above 100%."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * n**3 / best


def summarise(window, seconds, tokens_per_step, flops_per_token, peak_total):
    if not window:
        return {}
    finite = [m for m in window if m["finite"]]
    tps = len(window) * tokens_per_step / max(seconds, 1e-9)
    return {
        "loss": float(np.mean([m["loss"] for m in finite])) if finite else float("nan"),
        "grad_norm": float(np.mean([m["grad_norm"] for m in finite])) if finite else float("nan"),
        "learning_rate": window[-1]["learning_rate"],
        "tokens_per_s": tps,
        # None where the peak is unknown (a CPU's measured matmul rate is no bound: the
        # model's own kernels can beat it, which printed MFUs above 100%)
        "mfu": tps * flops_per_token / peak_total if peak_total else None,
        "skipped_steps": float(len(window) - len(finite)),
    }


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events (tensorboardX)."""

    def __init__(self, run_dir: str, tensorboard: bool):
        self._f = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, row: dict[str, float]) -> None:
        self._f.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        self._f.flush()
        if self._tb:
            for k, v in row.items():
                if v is not None:  # n/a (MFU on a CPU): null in metrics.jsonl, no TB point
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb:
            self._tb.close()


def progress_bar(c, start: int, total: int):
    if not c.progress:
        return None
    return tqdm(
        total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
    )


class ConsoleHandler(logging.Handler):
    """The trainer's own lines and every warning, written through tqdm so that a line never
    lands inside the progress bar's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "llama_jax.training.trainer"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    """The trainer's lines and warnings to stderr, whatever logging setup the libraries did;
    everything else of llama_jax goes to the run's log file (`log_to_file`)."""
    logger = logging.getLogger("llama_jax")
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def log_to_file(path: str):
    """All of llama_jax's log lines, and the libraries' (absl, orbax, TFDS) chatter that
    would otherwise reach the terminal, to `path` for the duration of the run."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger("llama_jax"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # a full disk: the run's own error says so
            handler.close()
