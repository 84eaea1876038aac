"""Fine-tuning around the one trainer: the default experiment and the checks before it runs.

`llama3 finetune --init_from BASE ...` runs `trainer.train` on a config from `default_config()`
(or `--config FILE`) after `prepare(c)`, which takes the architecture and tokenizer from BASE
(anything `Llama3.from_pretrained` reads). With `lora.rank > 0` the trainer trains adapters
only (model/lora.py); `lora.rank = 0` is a full fine-tune. The run directory's record of its
base (`finetune.json`) is formats/finetune_run.py's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from llama_jax.data.builtin_models import resolve_model_path
from llama_jax.formats import finetune_run
from llama_jax.formats.checkpoint import committed_steps
from llama_jax.formats.load import read_config
from llama_jax.model import lora as lora_lib
from llama_jax.model.config import ModelConfig
from llama_jax.tokenizer.chat_template import read_template_file
from llama_jax.training.experiment import base_config

DATA_FORMATS = ("text", "chat")
# ModelConfig fields an experiment may choose for a fine-tune; all others come from the base.
COMPUTE_FIELDS = ("param_dtype", "dtype", "attention_impl", "scan_layers", "remat_policy")


def default_config() -> ml_collections.ConfigDict:
    """The fine-tune experiment used when `llama3 finetune` gets no --config: LoRA r=8 on the
    built-in chatterbot/en dialogs, one epoch (experiments/sft_chat.py builds on it)."""
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
        read_template_file(c.chat_template)
    # a built-in model name -> its cached file
    c.init_from = resolve_model_path(c.init_from, "init_from")
    base = read_config(c.init_from)
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
    steps = committed_steps(os.path.join(c.run_dir, "checkpoints"))
    if not steps:
        return
    record = finetune_run.read_record(c.run_dir)
    if record is None:
        if c.init_from:
            raise ValueError(
                f"model_path={c.run_dir!r} holds checkpoints (step {steps[-1]}) of a run that is "
                f"not a fine-tune (no {finetune_run.FINETUNE_FILE}); give the fine-tune a new "
                f"directory, or "
                f"use {c.run_dir!r} as its base with --init_from"
            )
        return
    if not c.init_from:
        raise ValueError(
            f"model_path={c.run_dir!r} holds a fine-tune of {record['base']['path']}; resume it "
            f"with llama3 finetune --init_from {record['base']['path']}"
        )
    had = finetune_run.lora_from_record(record) if record.get("lora") else None
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
    record = finetune_run.read_record(run_dir)
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
