"""Experiment configs: the schema every `experiments/*.py` fills in, loading and overrides.

An experiment file defines `get_config(arg: str | None = None) -> ml_collections.ConfigDict`
built on `base_config()`. `llama3 train --config experiments/NAME.py[:ARG] --config.a.b=value`
loads it and applies overrides; an unknown key or a value of the wrong type is an error that
lists what is valid.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from llama_jax.data.sources import TEXT_UNITS
from llama_jax.model.config import ModelConfig, get_config

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


def add_config_keys(c: ml_collections.ConfigDict) -> None:
    """The fine-tuning keys of the experiment schema (see base_config)."""
    c.data_format = "text"  # text (pretraining documents) | chat (data/chat.py rows)
    c.train_on = "assistant"  # chat: assistant | last | all
    c.truncation = "right"  # chat: right | drop, for dialogs longer than seq_len
    c.chat_template = ""  # chat: a jinja2 template file instead of the tokenizer's own
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0: full fine-tune (or pretraining); > 0: train adapters only
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = "all"  # "all" or a comma list of wq,wk,wv,wo,w_gate,w_up,w_down
    c.base_dtype = ""  # LoRA: dtype the frozen base is kept in ("" = model.param_dtype)


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
    # how a local .txt file splits into documents: "document" (the whole file), "paragraph"
    # (blank-line separated) or "line" (as Hugging Face's `text` loader's sample_by).
    c.text_unit = "document"
    # local data_path with no valid_data_path: this share of the documents (or, for a single
    # document, of its tokens) is held out for validation; 0 = no validation.
    c.valid_fraction = 0.05
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
    c.loss_chunk_tokens = 1024  # cross-entropy over chunks of this many tokens; 0 = full logits
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
    c.eval_tasks = ""  # built-in eval tasks run at eval time, e.g. "shakespeare,sentiment_zh"
    c.eval_limit = 0  # items per eval task (0 = all)
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.peak_flops = 0.0  # per device, for MFU; 0 = measure a matmul at start
    c.tensorboard = True
    c.progress = True
    # test hooks (fault injection): make step k's loss NaN; stop after k steps.
    c.debug_stop_after = -1

    # fine-tuning (llama_jax.training.finetune): data format, chat masking, LoRA
    add_config_keys(c)
    return c


def demo_model_config() -> ml_collections.ConfigDict:
    """The Shakespeare demo's 10.4M-parameter model (8 layers, d=256, 4 query / 2 kv heads,
    MLP 768, 8k vocabulary, context 512), also the default for `llama3 train` on your data."""
    return model_config_dict(
        "small",
        vocab_size=8000,
        dim=256,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=768,
        max_seq_len=512,
    )


def default_config() -> ml_collections.ConfigDict:
    """`llama3 train` without `--config`: your own text on a CPU.

    A 10.4M-parameter Llama 3 (8 layers, d=256, 4 query / 2 kv heads, MLP 768, context 512;
    the Shakespeare demo's model), a SentencePiece tokenizer of up to 8,000 ids trained on the
    training data (unless `--config.tokenizer_path` is given), rows of 256 tokens, cosine
    schedule with 5% warmup, one epoch unless `--num_epochs` / `--config.num_steps` say
    otherwise. Local `.txt` files are split into paragraphs (blank-line separated); without
    `--valid_data_path`, 5% of them (or of the tokens, for a single paragraph) are held out.
    Every key can be changed with `--config.KEY=VALUE`; `llama3 train --print_config` shows
    them all.
    """
    c = base_config()
    c.model = demo_model_config()
    c.data_path = ""
    c.text_unit = "paragraph"
    c.tokenizer_vocab_size = 8000
    c.seq_len = 256
    c.batch_size = 8
    c.num_steps = 0
    c.num_epochs = 1
    c.learning_rate = 1e-3
    c.warmup_steps = -1  # 5% of the steps
    c.eval_every = 0
    c.checkpoint_every = 500
    c.run_dir = "runs/default"
    return c


# Counts that must be >= their lower bound; the text says what a boundary value means.
RANGES = {
    "batch_size": (1, ""),
    "seq_len": (2, ""),
    "grad_accum_steps": (1, ""),
    "num_steps": (0, "0 = derive from num_epochs"),
    "num_epochs": (0, "used when num_steps = 0"),
    "warmup_steps": (-1, "-1 = 5% of the steps"),
    "num_devices": (0, "0 = all devices"),
    "log_every": (1, ""),
    "eval_every": (0, "0 = only at the end"),
    "eval_batches": (0, "0 = the whole validation set"),
    "eval_limit": (0, "0 = every item of each eval task"),
    "checkpoint_every": (0, "0 = only the final checkpoint"),
    "keep_checkpoints": (1, ""),
    "tokenizer_vocab_size": (1, ""),
    "model.n_layers": (1, ""),
    "model.dim": (1, ""),
    "model.n_heads": (1, ""),
    "model.n_kv_heads": (1, ""),
    "model.vocab_size": (1, ""),
    "model.mlp_dim": (1, ""),
    "model.max_seq_len": (2, ""),
}


def check_ranges(c: ml_collections.ConfigDict) -> None:
    """Rejects counts out of range (negative, or 0 where 0 means nothing) before any work."""
    for key, (low, meaning) in RANGES.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            continue
        value = node[leaf]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            note = f"; {meaning}" if meaning else ""
            flag = {v: k for k, v in LEGACY_FLAGS.items()}.get(key)
            name = f"--{flag}" if flag else f"--config.{key}"
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}{note}")
    for key in ("learning_rate",):
        if not c[key] > 0:
            raise ValueError(f"--{key}={c[key]!r}: must be > 0")
    if not 0.0 <= c.valid_fraction < 1.0:
        raise ValueError(f"--config.valid_fraction={c.valid_fraction!r}: must be in [0, 1)")
    if c.text_unit not in TEXT_UNITS:
        raise ValueError(f"--config.text_unit={c.text_unit!r}; valid: {', '.join(TEXT_UNITS)}")


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


_KINDS = {
    "int": "an integer, e.g. 8",
    "float": "a number, e.g. 3e-4",
    "bool": "true or false",
    "str": "a string",
}


def apply_override(
    c: ml_collections.ConfigDict, key: str, text: str, flag: str | None = None
) -> None:
    """Sets dotted `key` from its command-line text, type-checked against the default;
    `flag` is how the user spelt it (e.g. --batch_size), for the error message."""
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
    except (TypeError, ValueError):
        want = type(current).__name__
        raise ValueError(
            f"{flag or '--config.' + key}={text!r}; valid: {_KINDS.get(want, want)}"
        ) from None


def _unknown(c: ml_collections.ConfigDict, key: str) -> str:
    keys = _all_keys(c)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # a misspelt leaf under the right parent, or the right leaf elsewhere
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3] or [
            k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], 1, 0.75)
        ][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint} (--print_config lists all {len(keys)})"


def parse_overrides(c: ml_collections.ConfigDict, argv: Sequence[str]) -> list[str]:
    """Applies `--config.k=v` and the legacy flags in `argv`; returns what it did not consume.

    What the user gives wins over the experiment file: a given number of epochs replaces the
    file's `num_steps` (set to 0, "derive from epochs"); giving both is refused.
    """
    given = _apply_overrides(c, argv)
    keys = {key for key, _ in given}
    if "num_epochs" in keys:
        if "num_steps" in keys and c.num_steps > 0:
            raise ValueError(
                f"both num_steps={c.num_steps} and num_epochs={c.num_epochs} were given; "
                "give one (num_steps wins only when num_epochs is not set)"
            )
        c.num_steps = 0
    return [a for key, a in given if key is None]


def _apply_overrides(c: ml_collections.ConfigDict, argv: Sequence[str]) -> list:
    """(config key or None, argument) per argument, applying each recognised override."""
    given = []
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
            given.append((None, a))
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{a} needs a value")
            value = args[i + 1]
            i += 1
        apply_override(c, key, value, flag=f"--{name}")
        given.append((key, a))
        i += 1
    return given
