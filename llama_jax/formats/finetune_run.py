"""Fine-tune run records: which base a fine-tune started from, and its LoRA adapters on load.

A fine-tuning run directory is a model directory plus `finetune.json`:
  {"format": "llama_jax.finetune/1",
   "base": {"path": ABS, "architecture": {...ModelConfig...}, "fingerprint": "sha256:..."},
   "lora": {"rank", "alpha", "dropout", "targets"} or null}
Its checkpoints hold the adapters alone under LoRA; `merge_run` checks the base's architecture
and weights fingerprint and merges the newest adapters into it (formats.load reads the base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np

from llama_jax.atomic import write_atomic
from llama_jax.formats import peft
from llama_jax.formats.checkpoint import committed_steps, load_verified_params
from llama_jax.model import lora as lora_lib
from llama_jax.model.config import ModelConfig

FINETUNE_FILE = "finetune.json"
FORMAT = "llama_jax.finetune/1"


def fingerprint(params: Any) -> str:
    """sha256 over every leaf's path, shape, dtype and a strided sample of its values.

    Reads at most ~64k values per tensor, so an 8B base is fingerprinted in seconds; two bases
    that differ only in unsampled values are told apart by no one (they would be one model
    re-saved). The sample is rounded to bfloat16 first, so a base and its bf16 copy (the default
    dtype `Llama3.from_pretrained` loads in) have the same fingerprint.
    """
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        a = np.asarray(leaf)
        flat = a.reshape(-1)
        step = max(1, flat.size // 65536)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}".encode())
        sample = flat[::step].astype(np.float32).astype(ml_dtypes.bfloat16)
        h.update(np.ascontiguousarray(sample).tobytes())
    return "sha256:" + h.hexdigest()


def base_record(path: str, config: ModelConfig, params: Any) -> dict[str, Any]:
    arch = {k: getattr(config, k) for k in ModelConfig.ARCHITECTURE_FIELDS}
    return {"path": os.path.abspath(path), "architecture": arch, "fingerprint": fingerprint(params)}


def write_record(run_dir: str, base: dict[str, Any], lora: lora_lib.LoraConfig | None) -> None:
    record = {
        "format": FORMAT,
        "base": base,
        "lora": None if lora is None else dataclasses.asdict(lora),
    }
    write_atomic(os.path.join(run_dir, FINETUNE_FILE), json.dumps(record, indent=2))


def read_record(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, FINETUNE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def is_lora_run(path: str) -> bool:
    record = read_record(path) if os.path.isdir(path) else None
    return bool(record and record.get("lora"))


def lora_from_record(record: dict[str, Any]) -> lora_lib.LoraConfig:
    d = dict(record["lora"])
    d["targets"] = tuple(d["targets"])
    return lora_lib.LoraConfig(**d)


def check_base(record: dict[str, Any], config: ModelConfig, params: Any, where: str) -> None:
    """Raises unless (config, params) is the base `record` describes."""
    arch = record["base"]["architecture"]
    diff = {k: (v, getattr(config, k)) for k, v in arch.items() if getattr(config, k) != v}
    if diff:
        raise ValueError(
            f"{where}: the adapter was trained on a base of another architecture "
            f"(field: (recorded, given)): {diff}"
        )
    got = fingerprint(params)
    if got != record["base"]["fingerprint"]:
        raise ValueError(
            f"{where}: the base weights differ from those the adapter was trained on "
            f"(fingerprint {got[:19]}..., recorded {record['base']['fingerprint'][:19]}...; "
            f"recorded base: {record['base']['path']})"
        )


def run_adapters(run_dir: str) -> Any:
    """The adapter tree of a LoRA run's newest committed checkpoint (numpy)."""

    steps = committed_steps(os.path.join(run_dir, "checkpoints"))
    if not steps:
        raise ValueError(f"{run_dir} has no committed checkpoint yet")
    step, adapters = load_verified_params(os.path.join(run_dir, "checkpoints"))
    layers = [v for k, v in adapters.items() if k == "layers" or k.startswith("layers_")]
    if len(layers) != len(adapters) or not all(
        isinstance(ab, dict) and set(ab) == {"a", "b"}
        for layer in layers
        for mod in layer.values()
        for ab in mod.values()
    ):
        raise ValueError(
            f"{run_dir}: the checkpoint of step {step} holds no LoRA adapters (keys "
            f"{sorted(adapters)}), though {FINETUNE_FILE} names a LoRA config"
        )
    return adapters


def merge_run(path, record, config, params, dtype):
    check_base(record, config, params, path)
    lora = lora_from_record(record)
    merged = lora_lib.merge(params, run_adapters(path), lora.scale)
    if dtype is not None:
        merged = jax.tree.map(lambda a: np.asarray(a).astype(dtype), merged)
    return merged


def export_peft(run_dir: str, output_dir: str) -> ModelConfig:
    """`llama3 convert --format peft`: a LoRA run's newest adapters as a PEFT directory."""

    if not is_lora_run(run_dir):
        raise ValueError(
            f"--format peft needs a llama_jax LoRA run directory (with {FINETUNE_FILE} naming "
            f"a lora config); {run_dir!r} is not one"
        )
    record = read_record(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = ModelConfig.from_dict(json.load(f))
    peft.save_peft(
        run_adapters(run_dir),
        lora_from_record(record),
        config,
        output_dir,
        base_model_name_or_path=record["base"]["path"],
    )
    return config
