"""Evaluation results out: the printed table, lm-eval's JSON (atomically written), and a run
directory's metrics.jsonl / TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from llama_jax.atomic import write_atomic
from llama_jax.eval.requests import Metric
from llama_jax.formats.checkpoint import committed_steps
from llama_jax.training.metrics import MetricsWriter

log = logging.getLogger("llama_jax.eval")

LM_EVAL_EXTRA = "pip install llama_jax[eval]"


def format_table(metrics: Sequence[Metric]) -> str:
    rows = [("task", "metric", "value", "stderr", "n")]
    for m in metrics:
        se = "" if m.stderr is None or math.isnan(m.stderr) else f"{m.stderr:.4f}"
        value = f"{m.value:.4f}" if abs(m.value) < 1e6 else f"{m.value:.4g}"
        rows.append((m.task, m.name, value, se, str(m.n)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_lm_eval_json(metrics: Sequence[Metric], config: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results layout: results[task]["metric,none"] / ["metric_stderr,none"]."""
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, int]] = {}
    for m in metrics:
        r = results.setdefault(m.task, {"alias": m.task})
        key = m.name if "," in m.name else f"{m.name},none"
        name, filt = key.split(",", 1)
        r[key] = m.value
        r[f"{name}_stderr,{filt}"] = "N/A" if m.stderr is None else m.stderr
        samples[m.task] = {"original": m.n, "effective": m.n}
    return {
        "results": results,
        "n-samples": samples,
        "n-shot": {t: config.get("num_fewshot", 0) for t in results},
        "versions": {t: 1.0 for t in results},
        "config": config,
    }


def log_to_run_dir(run_dir: str, metrics: Sequence[Metric], step: int | None = None) -> int:
    """Appends `eval/<task>/<metric>` to metrics.jsonl and TensorBoard at `step` (default:
    the newest committed checkpoint); returns the step."""
    if step is None:
        steps = committed_steps(os.path.join(run_dir, "checkpoints"))
        step = steps[-1] if steps else 0
    writer = MetricsWriter(run_dir, tensorboard=True)
    try:
        writer.write(step, {f"eval/{m.task}/{m.name}": m.value for m in metrics})
    finally:
        writer.close()
    return step


def write_json(path: str, metrics: Sequence[Metric], config: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(to_lm_eval_json(metrics, config), indent=2, ensure_ascii=False))
