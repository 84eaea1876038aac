"""Meta checkpoints (params.json + consolidated.NN.pth, model-parallel shards merged) -> params.

`.pth` shards are opened with `torch.load(mmap=True, weights_only=True)`, tensor by tensor.
Meta wq/wk rows are in interleaved rotary order; HF's are half-split (a fixed permutation).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.formats.hf import tensors_to_params, with_param_dtype
from llama_jax.model.config import ModelConfig

# ----------------------------------------------------------------------------- Meta
# Llama 3's reference model (fairscale) splits these on dim 0: the column-parallel projections
# and `tok_embeddings`, a VocabParallelEmbedding (Llama 2's ParallelEmbedding split dim 1).
_META_DIM0 = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")


def is_meta_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "params.json")) and bool(
        glob.glob(os.path.join(path, "consolidated.*.pth"))
    )


def _meta_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved rotary rows -> Hugging Face half-split rows, per head."""
    rows, cols = w.shape
    h = rows // n_heads
    return w.reshape(n_heads, h // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _load_pth(torch: Any, path: str) -> Any:
    """torch.load that only unpickles tensors; anything else is refused, in one line."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path}: refused an unsafe pickle (it holds more than tensors, so loading it could "
            f"run code; torch.load weights_only=True said: {first[:200]})"
        ) from None
    except RuntimeError as e:  # a truncated or corrupt zip archive
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None


def meta_tensor_getter(path: str, config: ModelConfig) -> Callable[[str], np.ndarray]:
    """HF name -> array, reading Meta model-parallel shards lazily (mmap) and merging them."""
    try:
        import torch
    except ImportError as e:  # torch is only needed for Meta .pth files.
        raise ImportError("reading Meta .pth checkpoints needs torch: pip install torch") from e
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    shards = [_load_pth(torch, f) for f in files]
    hf_to_meta = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_map = {
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
    }

    def meta_name(name: str) -> str:
        if name in hf_to_meta:
            return hf_to_meta[name]
        _, _, i, rest = name.split(".", 3)
        module, _ = rest.rsplit(".", 1)
        return f"layers.{i}.{layer_map[module]}.weight"

    def get(name: str) -> np.ndarray:
        mname = meta_name(name)
        missing = [f for f, s in zip(files, shards) if mname not in s]
        if missing:
            raise KeyError(f"{path}: {os.path.basename(missing[0])} has no tensor {mname!r}")
        parts = [_torch_to_numpy(s[mname]) for s in shards]
        kind = mname.split(".")[-2]
        if len(parts) == 1 or parts[0].ndim == 1:
            w = parts[0]
        elif kind in _META_DIM0:
            w = np.concatenate(parts, axis=0)
        else:  # the row-parallel wo and w2 are split on dim 1
            w = np.concatenate(parts, axis=1)
        if kind == "wq":
            w = _meta_permute(w, config.n_heads)
        elif kind == "wk":
            w = _meta_permute(w, config.n_kv_heads)
        return w

    return get


def load_meta(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """Reads a Meta checkpoint directory (params.json + consolidated.NN.pth)."""
    with open(os.path.join(path, "params.json")) as f:
        config = ModelConfig.from_meta(json.load(f))
    params = tensors_to_params(meta_tensor_getter(path, config), config, dtype)
    return with_param_dtype(config, params, compute=True), params  # as for HF, above
