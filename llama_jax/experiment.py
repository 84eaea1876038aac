"""Experiment configs: the schema every `experiments/*.py` fills in, loading and overrides.

An experiment file defines `get_config(arg: str | None = None) -> ml_collections.ConfigDict`
built on `base_config()`. `llama3 train --config experiments/NAME.py[:ARG] --config.a.b=value`
loads it and applies overrides; an unknown key or a value of the wrong type is an error that
lists what is valid.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from llama_jax.config import ModelConfig, get_config

# The flags users of the original `llama3` tool know, mapped to config keys.
LEGACY_FLAGS = {
    "data_path": "data_path",
    "valid_data_path": "valid_data_path",
    "model_path": "run_dir",
    "num_gpus": "num_devices",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "num_epochs": "num_epochs",
}


def model_config_dict(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A ConfigDict with every ModelConfig field of `preset` (so each is overridable)."""
    fields = dataclasses.asdict(get_config(preset, **overrides))
    cd = ml_collections.ConfigDict()
    for key, value in fields.items():
        if key == "rope_scaling_factor" and value is None:
            value = config_dict.placeholder(float)
        cd[key] = value
    return cd


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment can set, with defaults."""
    c = ml_collections.ConfigDict()
    c.model = model_config_dict("tiny")
    c.init_from = ""  # a model directory to start from (continued pretraining)

    # data
    c.data_path = "shakespeare"
    c.valid_data_path = ""  # default: the validation split of data_path
    c.train_split = "train"
    c.valid_split = "validation"
    c.data_dir = ""  # TFDS data dir ("" = TFDS default)
    c.cache_dir = ""  # token cache ("" = <run_dir>/../.token_cache)
    c.text_field = "text"
    c.seq_len = 256
    c.add_bos = True
    c.add_eos = True

    # tokenizer: a file/dir, or "" to train a SentencePiece model of tokenizer_vocab_size on
    # the training split into the run directory (once).
    c.tokenizer_path = ""
    c.tokenizer_vocab_size = 8000

    # optimisation
    c.batch_size = 8  # global, in sequences
    c.grad_accum_steps = 1
    c.num_steps = 1000  # 0 = derive from num_epochs
    c.num_epochs = 0  # used when num_steps == 0
    c.learning_rate = 3e-4
    c.schedule = "cosine"
    c.warmup_steps = 100
    c.min_lr_ratio = 0.1
    c.wsd_decay_fraction = 0.2
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1
    c.grad_clip = 1.0
    c.z_loss = 0.0
    c.loss_chunk_tokens = (
        1024  # cross-entropy in chunks of this many tokens (loss.py); 0 = full logits
    )
    c.nan_policy = "abort"  # abort | skip
    c.seed = 0

    # parallelism
    c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); one entry may be -1
    c.num_devices = 0  # 0 = all
    c.coordinator_address = ""  # multi-host without auto-detection: host:port
    c.num_processes = 0
    c.process_id = -1

    # bookkeeping
    c.run_dir = "runs/default"
    c.log_every = 10
    c.eval_every = 0  # 0 = only at the end
    c.eval_batches = 0  # 0 = the whole validation split
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.peak_flops = 0.0  # per device, for MFU; 0 = measure a matmul at start
    c.tensorboard = True
    c.progress = True
    # test hooks (fault injection): make step k's loss NaN; stop after k steps.
    c.debug_nan_step = -1
    c.debug_stop_after = -1
    return c


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen ModelConfig an experiment config describes."""
    fields = {k: v for k, v in c.model.to_dict().items()}
    return ModelConfig(**fields)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/experiment.py[:arg]` and calls its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment file {path!r} does not exist")
    name = "llama_jax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg=None)")
    return module.get_config(arg or None)


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def _all_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += _all_keys(v, prefix + k + ".")
        else:
            keys.append(prefix + k)
    return keys


def apply_override(c: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` from its command-line text, type-checked against the default."""
    parts = key.split(".")
    node = c
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise KeyError(_unknown(c, key))
        node = node[p]
    leaf = parts[-1]
    if leaf not in node:
        raise KeyError(_unknown(c, key))
    current = node[leaf]
    ref = node.get_ref(leaf)
    if current is None and ref.get_type() is not None:  # a typed placeholder
        current = ref.get_type()(0)
    try:
        value = _parse_value(text, current)
        node[leaf] = value
    except (TypeError, ValueError) as e:
        want = type(current).__name__
        raise ValueError(f"--config.{key}={text!r}: expected {want} ({e})") from None


def _unknown(c: ml_collections.ConfigDict, key: str) -> str:
    return f"unknown config key {key!r}; valid keys: {', '.join(sorted(_all_keys(c)))}"


def parse_overrides(c: ml_collections.ConfigDict, argv: Sequence[str]) -> list[str]:
    """Applies `--config.k=v` and the legacy flags in `argv`; returns what it did not consume."""
    rest = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        key = None
        if name.startswith("config."):
            key = name[len("config.") :]
        elif name in LEGACY_FLAGS:
            key = LEGACY_FLAGS[name]
        if key is None:
            rest.append(a)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{a} needs a value")
            value = args[i + 1]
            i += 1
        apply_override(c, key, value)
        i += 1
    return rest
