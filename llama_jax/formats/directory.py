"""llama_jax model directories and training run directories (config.json + params or steps)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from llama_jax.atomic import write_atomic
from llama_jax.formats.checkpoint import (
    PARAMS_DIR,
    committed_steps,
    load_params,
    load_verified_params,
    save_params,
)
from llama_jax.model.config import ModelConfig

# Beside the tokenizer file: the chat template and the tokens / eos ids it uses.
CHAT_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def is_llama_jax_dir(path: str) -> bool:

    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return False
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("format") == "llama_jax.ModelConfig"


def copy_tokenizer(src: str, dst: str, extra: tuple[str, ...] = ()) -> str | None:
    """Copies the tokenizer file(s) as they came; returns the main file's name, if any."""
    found = None
    for name in TOKENIZER_FILES + extra:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:  # atomic: a failed export leaves no partial tokenizer
                write_atomic(os.path.join(dst, name), f.read())
            if name in TOKENIZER_FILES and found is None:
                found = name
    return found


def save_llama_jax(
    params: dict,
    config: ModelConfig,
    path: str,
    tokenizer_src: str | None,
    write_tokenizer: Callable[[str], Any] | None = None,
) -> None:
    """Writes a llama_jax model directory: config.json, tokenizer file, params/ (orbax).

    The directory is assembled next to its destination and renamed into place, so a failed
    conversion never leaves a directory that looks complete.
    """

    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"output directory {path} exists and is not empty")
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json())
        if tokenizer_src:
            copy_tokenizer(tokenizer_src, tmp, CHAT_FILES)  # the chat template travels too
        if write_tokenizer is not None:  # e.g. a GGUF file's tokenizer as tokenizer.json
            write_tokenizer(tmp)
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_run_dir(path: str) -> bool:
    """A training run directory: a llama_jax config.json and committed checkpoints."""

    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    with open(os.path.join(path, "config.json")) as f:
        if json.load(f).get("format") != "llama_jax.ModelConfig":
            return False
    return bool(committed_steps(os.path.join(path, "checkpoints")))


def load_llama_jax(path: str) -> tuple[ModelConfig, dict]:
    """A llama_jax model directory, or a run directory's newest checkpoint that verifies."""

    with open(os.path.join(path, "config.json")) as f:
        config = ModelConfig.from_dict(json.load(f))
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return config, load_params(os.path.join(path, PARAMS_DIR))
    # Verified as resume verifies: a flipped bit falls back to an older step, with a warning.
    _, params = load_verified_params(os.path.join(path, "checkpoints"))
    return config, params
