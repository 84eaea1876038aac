"""Fine-tuning around the one trainer: the default experiment, the base record, adapters on load.

`llama3 finetune --init_from BASE ...` runs `train.train` on a config from `default_config()`
(or `--config FILE`) after `prepare(c)`, which takes the architecture and tokenizer from BASE
(anything `Llama3.from_pretrained` reads). With `lora.rank > 0` the trainer trains adapters
only (lora.py); `lora.rank = 0` is a full fine-tune.

A fine-tuning run directory is a model directory plus `finetune.json`:
  {"format": "llama_jax.finetune/1",
   "base": {"path": ABS, "architecture": {...ModelConfig...}, "fingerprint": "sha256:..."},
   "lora": {"rank", "alpha", "dropout", "targets"} or null}
Its checkpoints hold the adapters alone under LoRA; `load_lora_run` loads the recorded base,
checks its architecture and weights fingerprint, and merges the newest adapters into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections
import numpy as np

from llama_jax import lora as lora_lib
from llama_jax.config import ModelConfig

FINETUNE_FILE = "finetune.json"
FORMAT = "llama_jax.finetune/1"
DATA_FORMATS = ("text", "chat")
# ModelConfig fields an experiment may choose for a fine-tune; all others come from the base.
COMPUTE_FIELDS = ("param_dtype", "dtype", "attention_impl", "scan_layers", "remat_policy")


def add_config_keys(c: ml_collections.ConfigDict) -> None:
    """The fine-tuning keys of the experiment schema (see experiment.base_config)."""
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


def default_config() -> ml_collections.ConfigDict:
    """The fine-tune experiment used when `llama3 finetune` gets no --config: LoRA r=8 on the
    built-in chatterbot/en dialogs, one epoch (experiments/sft_chat.py builds on it)."""
    from llama_jax.experiment import base_config

    c = base_config()
    c.data_path = "chatterbot/en"
    c.data_format = "chat"
    c.seq_len = 256
    c.batch_size = 8
    c.num_steps = 0
    c.num_epochs = 1
    c.learning_rate = 2e-4
    c.schedule = "cosine"
    c.warmup_steps = 10
    c.weight_decay = 0.0
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.checkpoint_every = 200
    c.eval_every = 0
    c.log_every = 10
    c.run_dir = "runs/finetune"
    return c


# ----------------------------------------------------------------------------- base models
def read_base_config(path: str) -> ModelConfig:
    """The ModelConfig of anything `Llama3.from_pretrained` reads, without reading weights."""
    from llama_jax import convert

    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from={path!r} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from={path!r} is not a model directory")
    if convert.is_llama_jax_dir(path) or convert.is_run_dir(path):
        with open(os.path.join(path, "config.json")) as f:
            return ModelConfig.from_dict(json.load(f))
    if convert.is_hf_dir(path):
        return convert.read_hf_config(path)
    if convert.is_meta_dir(path):
        with open(os.path.join(path, "params.json")) as f:
            return ModelConfig.from_meta(json.load(f))
    convert.load_any(path)  # raises the error that lists the accepted layouts
    raise AssertionError("unreachable")


def fingerprint(params: Any) -> str:
    """sha256 over every leaf's path, shape, dtype and a strided sample of its values.

    Reads at most ~64k values per tensor, so an 8B base is fingerprinted in seconds; two bases
    that differ only in unsampled values are told apart by no one (they would be one model
    re-saved). The sample is rounded to bfloat16 first, so a base and its bf16 copy (the default
    dtype `Llama3.from_pretrained` loads in) have the same fingerprint.
    """
    import jax
    import ml_dtypes

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        a = np.asarray(leaf)
        flat = a.reshape(-1)
        step = max(1, flat.size // 65536)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}".encode())
        sample = flat[::step].astype(np.float32).astype(ml_dtypes.bfloat16)
        h.update(np.ascontiguousarray(sample).tobytes())
    return "sha256:" + h.hexdigest()


def lora_config(c: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    """The run's LoraConfig, or None for a full fine-tune / pretraining (rank 0)."""
    if "lora" not in c:
        return None
    rank = c.lora.rank
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(
            f"lora.rank={rank!r}: LoRA needs an integer rank > 0 (0 means a full fine-tune)"
        )
    if rank == 0:
        return None
    return lora_lib.LoraConfig(
        rank=rank,
        alpha=float(c.lora.alpha),
        dropout=float(c.lora.dropout),
        targets=lora_lib.parse_targets(c.lora.targets),
    )


def prepare(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills a fine-tune config from its base: architecture, tokenizer; checks what it can.

    The architecture comes from `init_from`; only COMPUTE_FIELDS stay as the experiment set
    them. The tokenizer is the base's unless tokenizer_path is set.
    """
    if not c.init_from:
        raise ValueError("fine-tuning needs a base model: --init_from BASE (a model directory)")
    lora_config(c)  # bad rank / targets / dropout: an error before anything is loaded
    if c.data_format not in DATA_FORMATS:
        raise ValueError(f"data_format={c.data_format!r}; valid: {', '.join(DATA_FORMATS)}")
    if c.base_dtype not in BASE_DTYPES:
        valid = ", ".join(repr(d) for d in BASE_DTYPES)
        raise ValueError(f"base_dtype={c.base_dtype!r}; valid: {valid} ('' = model.param_dtype)")
    if c.get("chat_template"):  # a missing or broken template: one line before anything loads
        from llama_jax.tokenizer.chat_template import read_template_file

        read_template_file(c.chat_template)
    base = read_base_config(c.init_from)
    keep = {k: c.model[k] for k in COMPUTE_FIELDS}
    if c.lora.rank > 0 and not c.base_dtype:
        c.base_dtype = base.param_dtype if base.param_dtype != "float32" else ""
    for field in dataclasses.fields(ModelConfig):
        if field.name in c.model and field.name not in COMPUTE_FIELDS:
            value = getattr(base, field.name)
            with c.model.ignore_type():
                c.model[field.name] = value
    for k, v in keep.items():
        c.model[k] = v
    if not c.tokenizer_path:
        c.tokenizer_path = c.init_from
    return c


BASE_DTYPES = ("", "float32", "bfloat16", "float16")


def check_run_dir(c: ml_collections.ConfigDict) -> None:
    """A fine-tune writes to a new directory, or resumes one of the same kind. Writes nothing.

    Refused before anything is read or written: the base's own directory as the run directory
    (the fine-tune would write over the base's files), a directory holding checkpoints of a
    run that is not a fine-tune, and one whose fine-tune used other LoRA settings (the
    checkpoints could not be restored into this run's state). The base's weights are compared
    with the recorded ones once they are read (`check_resume`).
    """
    if c.init_from and os.path.realpath(c.run_dir) == os.path.realpath(c.init_from):
        raise ValueError(
            f"model_path={c.run_dir!r} is the base model's own directory (init_from); give the "
            "fine-tune a new directory"
        )
    from llama_jax.checkpoint import committed_steps

    steps = committed_steps(os.path.join(c.run_dir, "checkpoints"))
    if not steps:
        return
    record = read_record(c.run_dir)
    if record is None:
        if c.init_from:
            raise ValueError(
                f"model_path={c.run_dir!r} holds checkpoints (step {steps[-1]}) of a run that is "
                f"not a fine-tune (no {FINETUNE_FILE}); give the fine-tune a new directory, or "
                f"use {c.run_dir!r} as its base with --init_from"
            )
        return
    if not c.init_from:
        raise ValueError(
            f"model_path={c.run_dir!r} holds a fine-tune of {record['base']['path']}; resume it "
            f"with llama3 finetune --init_from {record['base']['path']}"
        )
    had = _lora_from_record(record) if record.get("lora") else None
    want = lora_config(c)
    if had != want:
        raise ValueError(
            f"model_path={c.run_dir!r} holds a {_describe(had)} fine-tune (step {steps[-1]}); "
            f"this one is {_describe(want)}: resume with the same settings, or use a new directory"
        )


def _describe(lora: lora_lib.LoraConfig | None) -> str:
    if lora is None:
        return "full (lora.rank=0)"
    return (
        f"LoRA (rank={lora.rank}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, "
        f"targets={','.join(lora.targets)})"
    )


def check_resume(run_dir: str, base: dict[str, Any]) -> None:
    """A run resumed from its checkpoints must start from the base it was trained on."""
    from llama_jax.checkpoint import committed_steps

    record = read_record(run_dir)
    if record is None or not committed_steps(os.path.join(run_dir, "checkpoints")):
        return
    if record["base"]["fingerprint"] != base["fingerprint"]:
        raise ValueError(
            f"init_from={base['path']} is not the base {run_dir} was fine-tuned from (weights "
            f"fingerprint {base['fingerprint'][:19]}..., recorded "
            f"{record['base']['fingerprint'][:19]}... for {record['base']['path']}); resume "
            "with that base, or use a new directory"
        )


def vocab_hint(c: ml_collections.ConfigDict, tokenizer_ids: int, vocab_size: int) -> str:
    """The error for a tokenizer larger than the vocabulary of the base (`init_from`), which
    starting from a base cannot change (unlike `--config.model.vocab_size` in pretraining)."""
    base = c.init_from
    if not c.tokenizer_path:
        what = f"the tokenizer trained for this run (tokenizer_vocab_size={c.tokenizer_vocab_size})"
        fix = (
            f"set --config.tokenizer_path={base} (the base's own) or "
            f"--config.tokenizer_vocab_size={vocab_size} or less"
        )
    elif os.path.realpath(c.tokenizer_path) == os.path.realpath(base):
        what = f"the tokenizer of {base}"
        fix = "the base's own tokenizer file is not the one its weights were trained with"
    else:
        what = f"the tokenizer {c.tokenizer_path}"
        fix = f"use the base's own (leave tokenizer_path empty) or one of <= {vocab_size} ids"
    return (
        f"{what} has {tokenizer_ids} ids but the base {base} has vocab_size={vocab_size}, which "
        f"a run started from a base cannot change; {fix}"
    )


def base_record(path: str, config: ModelConfig, params: Any) -> dict[str, Any]:
    arch = {k: getattr(config, k) for k in ModelConfig.ARCHITECTURE_FIELDS}
    return {"path": os.path.abspath(path), "architecture": arch, "fingerprint": fingerprint(params)}


def write_record(run_dir: str, base: dict[str, Any], lora: lora_lib.LoraConfig | None) -> None:
    record = {
        "format": FORMAT,
        "base": base,
        "lora": None if lora is None else dataclasses.asdict(lora),
    }
    tmp = os.path.join(run_dir, FINETUNE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, FINETUNE_FILE))


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


def _lora_from_record(record: dict[str, Any]) -> lora_lib.LoraConfig:
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
    from llama_jax.checkpoint import committed_steps, load_params

    steps = committed_steps(os.path.join(run_dir, "checkpoints"))
    if not steps:
        raise ValueError(f"{run_dir} has no committed checkpoint yet")
    state = os.path.join(run_dir, "checkpoints", str(steps[-1]), "state")
    adapters = load_params(state, subtree="params")
    layers = [v for k, v in adapters.items() if k == "layers" or k.startswith("layers_")]
    if len(layers) != len(adapters) or not all(
        isinstance(ab, dict) and set(ab) == {"a", "b"}
        for layer in layers
        for mod in layer.values()
        for ab in mod.values()
    ):
        raise ValueError(
            f"{run_dir}: the checkpoint of step {steps[-1]} holds no LoRA adapters (keys "
            f"{sorted(adapters)}), though {FINETUNE_FILE} names a LoRA config"
        )
    return adapters


def load_lora_run(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """(config, merged numpy params) of a LoRA run: its recorded base + its newest adapters."""
    from llama_jax import convert

    record = read_record(path)
    base_path = record["base"]["path"]
    if os.path.realpath(base_path) == os.path.realpath(path):
        raise ValueError(f"{path}/{FINETUNE_FILE} names the run itself as its base")
    if not os.path.isdir(base_path):
        raise FileNotFoundError(
            f"{path} is a LoRA run of the base {base_path}, which no longer exists; load the "
            f"base with Llama3.from_pretrained(BASE, adapter={path!r})"
        )
    config, params = convert.load_any(base_path)
    return config, _merge_run(path, record, config, params, dtype)


def _merge_run(path, record, config, params, dtype):
    import jax

    check_base(record, config, params, path)
    lora = _lora_from_record(record)
    merged = lora_lib.merge(params, run_adapters(path), lora.scale)
    if dtype is not None:
        merged = jax.tree.map(lambda a: np.asarray(a).astype(dtype), merged)
    return merged


def apply_adapter(config: ModelConfig, params: Any, adapter: str) -> dict:
    """Base params with a PEFT adapter directory or a llama_jax LoRA run merged in."""
    from llama_jax import peft_format

    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter={adapter!r} is not a directory")
    if peft_format.is_peft_dir(adapter):
        lora, adapters = peft_format.load_peft(adapter, config)
        return lora_lib.merge(params, adapters, lora.scale)
    if is_lora_run(adapter):
        return _merge_run(adapter, read_record(adapter), config, params, None)
    raise ValueError(
        f"adapter={adapter!r} is neither a PEFT LoRA directory (adapter_config.json + "
        "adapter_model.safetensors) nor a llama_jax LoRA run (finetune.json with lora)"
    )


def export_peft(run_dir: str, output_dir: str) -> ModelConfig:
    """`llama3 convert --format peft`: a LoRA run's newest adapters as a PEFT directory."""
    from llama_jax import peft_format

    if not is_lora_run(run_dir):
        raise ValueError(
            f"--format peft needs a llama_jax LoRA run directory (with {FINETUNE_FILE} naming "
            f"a lora config); {run_dir!r} is not one"
        )
    record = read_record(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = ModelConfig.from_dict(json.load(f))
    peft_format.save_peft(
        run_adapters(run_dir),
        _lora_from_record(record),
        config,
        output_dir,
        base_model_name_or_path=record["base"]["path"],
    )
    return config
