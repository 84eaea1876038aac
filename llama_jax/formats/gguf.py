"""GGUF files (llama.cpp's format) -> llama_jax (config, params).

A GGUF file holds key/value metadata (architecture, sizes, tokenizer, chat template) and named
tensors, many of them block-quantised. It is read with the `gguf` package (`GGUFReader`, which
memory-maps the file) and each tensor is dequantised with `gguf.quants.dequantize` only when the
params tree asks for it, so the peak is about one copy of the model in the target dtype.

llama.cpp names and layouts (W is a PyTorch Linear weight [out, in], as numpy sees GGUF data):
  token_embd [V, D]   output_norm [D]   output [V, D] (absent: tied to token_embd)
  blk.i.attn_norm / ffn_norm [D]   blk.i.attn_q / attn_k / attn_v / attn_output [out, in]
  blk.i.ffn_gate / ffn_up [F, D]   blk.i.ffn_down [D, F]   rope_freqs [H/2] (Llama 3.1)
attn_q / attn_k rows are stored per head in interleaved rotary order (llama.cpp's converter
permutes Hugging Face's half-split rows); they are permuted back here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from llama_jax.gguf_file import GGUFContainer
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama",)
# GGML type names this reader dequantises (through the `gguf` package).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# Hugging Face tensor name (as formats.hf names it) -> llama.cpp's.
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{module}.weight
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER_NAMES[module]}.{suffix}"


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face half-split rotary rows -> llama.cpp's interleaved rows, per head.

    Args:
      w: [n_heads * H, D] a q or k projection.
      n_heads: query heads for q, kv heads for k.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_qk`: llama.cpp's interleaved rows -> half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- the file
def is_gguf_file(path: str) -> bool:
    """A file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def find_gguf(path: str) -> str | None:
    """`path` if it is a `.gguf` file, the one `.gguf` in a directory, else None.

    Raises:
      ValueError: the directory holds more than one `.gguf` (which one is meant is unclear).
    """
    if os.path.isfile(path):
        return path if path.endswith(".gguf") or is_gguf_file(path) else None
    if not os.path.isdir(path):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise ValueError(
            f"{path} holds {len(found)} .gguf files ({', '.join(found[:5])}); pass one of them"
        )
    return os.path.join(path, found[0]) if found else None


class GGUFFile:
    """A GGUF file opened for reading: metadata as Python values, tensors on demand.

    Attributes:
      path: the file.
      metadata: key -> value (str, int, float, bool, or a list of them).
      tensors: name -> the reader's tensor (`tensor_type`, `shape` in GGML order, raw `data`).
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        self.path = path
        self._file = GGUFContainer(path)
        self.metadata: dict[str, Any] = self._file.metadata
        self.tensors = self._file.tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ValueError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata[key]

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def check_architecture(self) -> None:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )

    def check_tensor_types(self) -> None:
        """Every tensor's type is one this reader dequantises (checked before reading any)."""
        for name in self.tensors:
            kind = self._file.type_name(name)
            if kind not in SUPPORTED_TYPES:
                raise ValueError(
                    f"{self.path}: tensor {name} has GGML type {kind}, which is not supported; "
                    f"supported: {', '.join(SUPPORTED_TYPES)}"
                )

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantised to float32 (BF16/F16/F32 keep their exact values)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: the GGUF file has no tensor {name!r}")
        return self._file.dequantize(name)


# ----------------------------------------------------------------------------- config
def _rope_scaling(g: GGUFFile, config: ModelConfig) -> dict[str, Any]:
    """Llama 3.1 scaling fields from the `rope_freqs` tensor (and the scaling keys, if any).

    llama.cpp divides each inverse frequency by rope_freqs[i]: 1 for short wavelengths,
    `factor` for long ones, 1 / ((1 - s) / factor + s) in between, with s linear in
    1 / wavelength. The factor is the largest entry; the smooth band's line gives low and high
    freq factors for a given original context (the factors depend only on those ratios). The
    result is checked by recomputing the frequencies.
    """
    freqs = g.tensor("rope_freqs.weight").astype(np.float64).reshape(-1)
    if np.allclose(freqs, 1.0):
        return {}
    factor = float(g.get("llama.rope.scaling.factor", freqs.max()))
    orig = int(g.get("llama.rope.scaling.original_context_length", 8192))
    base = rope_inv_freq(dataclasses.replace(config, rope_scaling_factor=None)).astype(np.float64)
    inv_wavelen = base / (2 * np.pi)
    mid = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6 * factor)
    low, high = 1.0, 4.0
    if mid.sum() >= 2:
        s = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[mid], s, 1)  # s = (orig*u - low) / (high - low)
        span = orig / slope
        low = -intercept * span
        high = low + span
        low, high = round(low, 6), round(high, 6)
    candidates = [(low, high, orig)]
    if "llama.rope.scaling.original_context_length" not in g.metadata:
        # Too few smooth-band entries to fit: Meta's low/high (1, 4) with the original context
        # that reproduces the factors.
        candidates += [(1.0, 4.0, 2**p) for p in range(25)]
    for low, high, orig in candidates:
        fields = dict(
            rope_scaling_factor=factor,
            rope_low_freq_factor=low,
            rope_high_freq_factor=high,
            rope_original_max_len=orig,
        )
        scaled = rope_inv_freq(dataclasses.replace(config, **fields)).astype(np.float64)
        if np.allclose(base / scaled, freqs, rtol=1e-4, atol=1e-6):
            return fields
    raise ValueError(
        f"{g.path}: rope_freqs.weight is not a Llama 3.1 frequency scaling that llama_jax "
        f"can express (factor {factor}; no low/high freq factors and original context fit)"
    )


def read_config(g: GGUFFile) -> ModelConfig:
    """ModelConfig from a GGUF file's `llama.*` metadata; checks the vocabulary and tensors.

    Raises:
      ValueError (one line) for another architecture, an unsupported tensor type, a missing key,
      or a vocabulary size that disagrees with the embedding.
    """
    g.check_architecture()
    g.check_tensor_types()
    arch = g.architecture
    dim = int(g.require(f"{arch}.embedding_length"))
    n_heads = int(g.require(f"{arch}.attention.head_count"))
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{g.path}: no token_embd.weight tensor")
    embd_rows = int(g.tensors["token_embd.weight"].shape[0])
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = int(g.get(f"{arch}.vocab_size", len(tokens) if tokens else embd_rows))
    if vocab != embd_rows or (tokens is not None and len(tokens) > embd_rows):
        raise ValueError(
            f"{g.path}: the vocabulary ({arch}.vocab_size {vocab}, "
            f"{len(tokens) if tokens is not None else 'no'} tokenizer tokens) disagrees with "
            f"token_embd.weight's {embd_rows} rows"
        )
    head_dim = int(g.get(f"{arch}.attention.key_length", g.get(f"{arch}.rope.dimension_count", 0)))
    config = ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=int(g.require(f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g.get(f"{arch}.attention.head_count_kv", n_heads)),
        mlp_dim=int(g.require(f"{arch}.feed_forward_length")),
        head_dim=head_dim or dim // n_heads,
        norm_eps=float(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g.get(f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(g.get(f"{arch}.context_length", 8192)),
        tie_embeddings="output.weight" not in g.tensors,
    )
    if "rope_freqs.weight" in g.tensors:
        config = dataclasses.replace(config, **_rope_scaling(g, config))
    return config


def tensor_getter(g: GGUFFile, config: ModelConfig) -> Callable[[str], np.ndarray]:
    """Hugging Face name -> float32 array in Hugging Face layout (q/k rows un-permuted)."""

    def get(hf_name: str) -> np.ndarray:
        w = g.tensor(gguf_name(hf_name))
        if hf_name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.n_kv_heads)
        return w

    return get


def open_gguf(path: str) -> tuple[ModelConfig, Callable[[str], np.ndarray]]:
    """(config, Hugging Face name -> float32 tensor) of a GGUF file, checked up front.

    Nothing large is read until the getter is called: `formats.load.load_gguf` builds the params
    tree from it one tensor at a time.
    """
    g = GGUFFile(path)
    config = read_config(g)
    return config, tensor_getter(g, config)
