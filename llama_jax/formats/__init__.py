"""Model formats on disk: every layout a model is read from or written to.

safetensors   safetensors files, read and written without torch
hf            Hugging Face directories, and the tensor-name map every format shares
meta          Meta's consolidated.NN.pth checkpoints (model-parallel shards merged)
checkpoint    orbax: a model directory's params, a run's training checkpoints, verification
directory     llama_jax model directories and training run directories
peft          PEFT LoRA adapter directories
finetune_run  a fine-tune's record of its base; LoRA runs merged on load
load          `load_any` (what a path holds -> config + params), `convert`, adapters
"""

from llama_jax.formats.directory import (
    copy_tokenizer,
    is_llama_jax_dir,
    is_run_dir,
    load_llama_jax,
    save_llama_jax,
)
from llama_jax.formats.hf import (
    HF_EXTRA_FILES,
    is_hf_dir,
    load_hf,
    params_to_tensors,
    read_hf_config,
    save_hf,
    tensors_to_params,
)
from llama_jax.formats.load import apply_adapter, convert, load_any, load_lora_run, read_config
from llama_jax.formats.meta import is_meta_dir, load_meta
from llama_jax.formats.safetensors import SafetensorsFile, write_safetensors

__all__ = [
    "HF_EXTRA_FILES",
    "SafetensorsFile",
    "apply_adapter",
    "convert",
    "copy_tokenizer",
    "is_hf_dir",
    "is_llama_jax_dir",
    "is_meta_dir",
    "is_run_dir",
    "load_any",
    "load_hf",
    "load_llama_jax",
    "load_lora_run",
    "load_meta",
    "params_to_tensors",
    "read_config",
    "read_hf_config",
    "save_hf",
    "save_llama_jax",
    "tensors_to_params",
    "write_safetensors",
]
