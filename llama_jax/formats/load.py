"""One entry point for every model format: `load_any` tells a path's format from what it holds."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np

from llama_jax.formats import finetune_run, peft
from llama_jax.formats import gguf as gguf_format
from llama_jax.formats.checkpoint import PARAMS_DIR, LazyParams
from llama_jax.formats.directory import (
    copy_tokenizer,
    is_llama_jax_dir,
    is_run_dir,
    load_llama_jax,
    save_llama_jax,
)
from llama_jax.formats.gguf_write import GGUF_TYPES, check_gguf_output, save_gguf
from llama_jax.formats.hf import (
    HF_EXTRA_FILES,
    is_hf_dir,
    load_hf,
    read_hf_config,
    save_hf,
    tensors_to_params,
    with_param_dtype,
    write_hf_token_files,
)
from llama_jax.formats.meta import is_meta_dir, load_meta
from llama_jax.model import lora as lora_lib
from llama_jax.model.config import ModelConfig
from llama_jax.tokenizer import load_tokenizer
from llama_jax.tokenizer.gguf import GGUFTokenizer


def load_gguf(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """Reads a GGUF file (llama.cpp) into (config, numpy params), dequantised tensor by tensor
    into `dtype` (default float32)."""
    config, get = gguf_format.open_gguf(path)
    params = tensors_to_params(get, config, dtype or np.float32)
    return with_param_dtype(config, params, compute=True), params


def _gguf_in(path: str) -> str | None:
    """The GGUF file `path` is or holds, unless it is another kind of model directory."""
    if is_llama_jax_dir(path) or is_hf_dir(path) or is_meta_dir(path):
        return None
    return gguf_format.find_gguf(path)


def load_any(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """(config, numpy params) from a llama_jax, Hugging Face, Meta or run directory, a GGUF
    file (or a directory holding exactly one). Built-in model names are resolved above this
    layer (`data.builtin_models.resolve_model_path`: formats do not fetch)."""
    gguf_path = _gguf_in(path)
    if gguf_path is not None:
        return load_gguf(gguf_path, dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if finetune_run.is_lora_run(path):  # its checkpoints hold adapters: merge them into the base
        return load_lora_run(path, dtype)
    if is_llama_jax_dir(path) or is_run_dir(path):
        config, params = load_llama_jax(path)
        if dtype is not None:
            params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
        return config, params
    if is_hf_dir(path):
        return load_hf(path, dtype)
    if is_meta_dir(path):
        return load_meta(path, dtype)
    raise ValueError(
        f"{path} is not a model directory: expected a llama_jax directory (config.json with "
        "format llama_jax.ModelConfig + params/), a training run directory with a committed "
        "checkpoint, a Hugging Face directory (config.json + "
        "model.safetensors[.index.json]), a Meta directory (params.json + consolidated.*.pth), "
        "or a GGUF file (or a directory holding one)"
    )


def convert(
    input_dir: str,
    output_dir: str,
    fmt: str = "llama_jax",
    dtype: str | None = None,
    gguf_type: str | None = None,
):
    """`llama3 convert`: any supported model -> llama_jax or Hugging Face format, a GGUF file
    ("gguf", matrices in `gguf_type`, default f16), or a LoRA run's adapters alone in PEFT's
    format ("peft")."""
    if fmt not in ("llama_jax", "hf", "peft", "gguf"):
        raise ValueError(f"--format {fmt!r}; valid: 'llama_jax', 'hf', 'peft', 'gguf'")
    if gguf_type is not None and fmt != "gguf":
        raise ValueError(f"--gguf_type {gguf_type!r} is for --format gguf, not {fmt!r}")
    if dtype is not None and fmt == "gguf":
        raise ValueError(
            f"--dtype {dtype!r} does not apply to --format gguf: choose the matrices' type with "
            "--gguf_type (f32, f16, bf16, q8_0)"
        )
    if fmt == "gguf":
        gguf_type = gguf_type or "f16"
        if gguf_type not in GGUF_TYPES:
            raise ValueError(f"--gguf_type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
        check_gguf_output(output_dir)  # a directory, say: refused before the weights load
        tokenizer = load_tokenizer(input_dir)  # a model without one cannot become a GGUF
        config, params = load_any(input_dir)
        save_gguf(params, config, output_dir, tokenizer, gguf_type)
        return config
    if fmt == "peft":
        return finetune_run.export_peft(input_dir, output_dir)
    np_dtype = None
    if dtype is not None:
        valid = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
        if dtype not in valid:
            raise ValueError(f"--dtype {dtype!r}; valid: {sorted(valid)}")
        np_dtype = valid[dtype]
    if fmt == "hf" and np_dtype is None and is_llama_jax_dir(input_dir):
        # Stream leaf by leaf out of the orbax checkpoint.
        with open(os.path.join(input_dir, "config.json")) as f:
            config = ModelConfig.from_dict(json.load(f))
        save_hf(LazyParams(os.path.join(input_dir, PARAMS_DIR)), config, output_dir)
        _hf_tokenizer_files(input_dir, output_dir, config)
        return config
    config, params = load_any(input_dir, np_dtype)
    config = with_param_dtype(config, params)
    gguf_path = _gguf_in(input_dir)
    write_tokenizer = None
    if gguf_path is not None:  # tokenizer.json + tokenizer_config.json from the GGUF metadata
        write_tokenizer = GGUFTokenizer(gguf_path).save
    src = input_dir if os.path.isdir(input_dir) else None
    if fmt == "llama_jax":
        save_llama_jax(params, config, output_dir, src, write_tokenizer)
    else:
        save_hf(params, config, output_dir)
        if gguf_path is not None:
            # The GGUF's own special ids (SmolLM2: bos 1, eos and pad 2), not what the written
            # tokenizer.json alone suggests, nor ModelConfig.to_hf's Llama 3 ids.
            write_tokenizer(output_dir)
            write_hf_token_files(output_dir, config, GGUFTokenizer(gguf_path))
        else:
            _hf_tokenizer_files(input_dir, output_dir, config)
    return config


def _hf_tokenizer_files(input_dir: str, output_dir: str, config: ModelConfig) -> None:
    """The tokenizer as it came, plus the special ids transformers needs (see hf.py)."""
    copy_tokenizer(input_dir, output_dir, HF_EXTRA_FILES)
    try:
        tokenizer = load_tokenizer(output_dir)
    except (FileNotFoundError, ValueError):  # no tokenizer in the source: weights alone
        return
    write_hf_token_files(output_dir, config, tokenizer)


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of anything `Llama3.from_pretrained` reads, without reading weights."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from={path!r} does not exist")
    gguf_path = _gguf_in(path)
    if gguf_path is not None:
        return gguf_format.read_config(gguf_format.GGUFFile(gguf_path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from={path!r} is not a model directory")
    if is_llama_jax_dir(path) or is_run_dir(path):
        with open(os.path.join(path, "config.json")) as f:
            return ModelConfig.from_dict(json.load(f))
    if is_hf_dir(path):
        return read_hf_config(path)
    if is_meta_dir(path):
        with open(os.path.join(path, "params.json")) as f:
            return ModelConfig.from_meta(json.load(f))
    load_any(path)  # raises the error that lists the accepted layouts
    raise AssertionError("unreachable")


def load_lora_run(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """(config, merged numpy params) of a LoRA run: its recorded base + its newest adapters."""
    record = finetune_run.read_record(path)
    base_path = record["base"]["path"]
    if os.path.realpath(base_path) == os.path.realpath(path):
        raise ValueError(f"{path}/{finetune_run.FINETUNE_FILE} names the run itself as its base")
    if not os.path.exists(base_path):  # a directory or a GGUF file
        raise FileNotFoundError(
            f"{path} is a LoRA run of the base {base_path}, which no longer exists; load the "
            f"base with Llama3.from_pretrained(BASE, adapter={path!r})"
        )
    config, params = load_any(base_path)
    return config, finetune_run.merge_run(path, record, config, params, dtype)


def apply_adapter(config: ModelConfig, params: Any, adapter: str) -> dict:
    """Base params with a PEFT adapter directory or a llama_jax LoRA run merged in."""
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter={adapter!r} is not a directory")
    if peft.is_peft_dir(adapter):
        lora, adapters = peft.load_peft(adapter, config)
        return lora_lib.merge(params, adapters, lora.scale)
    if finetune_run.is_lora_run(adapter):
        return finetune_run.merge_run(
            adapter, finetune_run.read_record(adapter), config, params, None
        )
    raise ValueError(
        f"adapter={adapter!r} is neither a PEFT LoRA directory (adapter_config.json + "
        "adapter_model.safetensors) nor a llama_jax LoRA run (finetune.json with lora)"
    )
