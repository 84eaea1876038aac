"""Model architecture: one frozen, hashable dataclass and the named presets.

Everything about the network's shape and numerics lives in `ModelConfig`. Experiments pick a
preset by name and override fields with `dataclasses.replace`; nothing else configures the model.
Hugging Face `config.json` (transformers 4 and 5 layouts) and Meta `params.json` are read here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

FORMAT_NAME = "llama_jax.ModelConfig"
FORMAT_VERSION = 1

ATTENTION_IMPLS = ("xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_proj")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama 3 family architecture.

    Attributes:
      vocab_size: V, rows of the embedding table.
      dim: D, the residual stream width.
      n_layers: L.
      n_heads: N, query heads.
      n_kv_heads: K, key/value heads (N % K == 0; K == N is MHA, K == 1 is MQA).
      mlp_dim: F, the SwiGLU hidden width.
      head_dim: H; defaults to dim // n_heads.
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_scaling_factor: Llama 3.1 frequency scaling factor, or None for plain RoPE.
      rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len: Llama 3.1 scaling.
      max_seq_len: the longest sequence the model is used with (sampling caches, data checks).
      tie_embeddings: the output projection reuses the embedding table (Llama 3.2 1B/3B).
      param_dtype: dtype parameters are stored in.
      dtype: compute dtype of activations and matmuls (softmax and norms run in float32).
      attention_impl: "xla" (portable, CPU default), "cudnn" (GPU flash attention through
        `jax.nn.dot_product_attention`), "splash" (TPU Pallas splash attention).
      scan_layers: stack layer parameters on a leading `layers` axis and `nn.scan` over them.
      remat_policy: rematerialisation of each layer in the backward pass (see REMAT_POLICIES).
    """

    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    mlp_dim: int = 14336
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the bad field and what would be valid."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each kv head among n_heads // n_kv_heads heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name, valid in (
            ("attention_impl", ATTENTION_IMPLS),
            ("remat_policy", REMAT_POLICIES),
            ("param_dtype", DTYPES),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; valid: {valid}")
        if self.rope_scaling_factor is not None and not (
            self.rope_high_freq_factor > self.rope_low_freq_factor
        ):
            raise ValueError(
                "rope scaling needs rope_high_freq_factor > rope_low_freq_factor, got "
                f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}"
            )

    ARCHITECTURE_FIELDS = (
        "vocab_size",
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "mlp_dim",
        "head_dim",
        "tie_embeddings",
    )

    def architecture_diff(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that change the parameter shapes: {field: (self's, other's)} where they differ."""
        return {
            k: (getattr(self, k), getattr(other, k))
            for k in self.ARCHITECTURE_FIELDS
            if getattr(self, k) != getattr(other, k)
        }

    # ---------------------------------------------------------------- derived sizes
    def param_count(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        d, h = self.dim, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        mlp = 3 * d * self.mlp_dim
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + embed + head + d

    def matmul_param_count(self) -> int:
        """Parameters that take part in matmuls per token (embedding lookup excluded)."""
        d, h = self.dim, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        return self.n_layers * (attn + 3 * d * self.mlp_dim) + self.vocab_size * d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + 12 * L * T * N * H (causal not halved).

        The attention term counts QK^T and AV over the full T x T square, forward and backward,
        as in the PaLM appendix; state this formula next to any MFU figure.
        """
        attn = 12 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 6.0 * self.matmul_param_count() + attn

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        fmt = d.pop("format", FORMAT_NAME)
        version = d.pop("version", FORMAT_VERSION)
        if fmt != FORMAT_NAME or version > FORMAT_VERSION:
            raise ValueError(
                f"config format {fmt!r} version {version} is not readable by this llama_jax "
                f"(reads {FORMAT_NAME!r} up to version {FORMAT_VERSION})"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; valid: {sorted(fields)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Reads a Hugging Face Llama `config.json` (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(
                f"config.json has model_type={model_type!r}; llama_jax reads model_type 'llama'"
            )
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if any(a not in ("LlamaForCausalLM", "LlamaModel") for a in archs):
            raise ValueError(f"architectures={archs}; llama_jax reads ['LlamaForCausalLM']")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json sets {flag}=true; Llama 3 has no biases")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r}; Llama 3 uses 'silu'")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"pretraining_tp={hf['pretraining_tp']}; only 1 is supported")
        # transformers 5 nests rope settings in `rope_parameters`; 4 has top-level keys.
        rope = hf.get("rope_parameters") or {}
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        if not rope:
            scaling = hf.get("rope_scaling")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kw: dict[str, Any] = {}
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type != "llama3":
                raise ValueError(f"rope_type={rope_type!r}; supported: 'default', 'llama3'")
            kw = dict(
                rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_len=int(scaling["original_max_position_embeddings"]),
            )
        n_heads = hf["num_attention_heads"]
        kw.update(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            mlp_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            max_seq_len=int(hf.get("max_position_embeddings", 8192)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A transformers 4 style `config.json` (also read by transformers 5)."""
        scaling = None
        if self.rope_scaling_factor is not None:
            scaling = {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_len,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.mlp_dim,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "torch_dtype": self.param_dtype,
        }

    @classmethod
    def from_meta(cls, params: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Reads Meta's `params.json`."""
        dim = params["dim"]
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = params.get("multiple_of", 256)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        n_heads = params["n_heads"]
        kw: dict[str, Any] = dict(
            vocab_size=params.get("vocab_size", 128256),
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            mlp_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            max_seq_len=int(params.get("max_seq_len", 8192)),
        )
        if params.get("use_scaled_rope"):
            # Meta's reference hard-codes these; 8 for 3.1, 32 for 3.2 (given in params.json
            # as `rope_scaling_factor` by some releases).
            kw.update(
                rope_scaling_factor=float(params.get("rope_scaling_factor", 8.0)),
                rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0,
                rope_original_max_len=8192,
                max_seq_len=int(params.get("max_seq_len", 131072)),
            )
        kw.update(overrides)
        return cls(**kw)


# ---------------------------------------------------------------------- presets
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192)
_LLAMA31 = dict(
    _LLAMA3,
    rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
    max_seq_len=131072,
)
_LLAMA32 = dict(_LLAMA31, rope_scaling_factor=32.0, tie_embeddings=True)
_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_dim=28672)

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(_LLAMA3, **_8B),
    "llama3-70b": dict(_LLAMA3, **_70B),
    "llama3.1-8b": dict(_LLAMA31, **_8B),
    "llama3.1-70b": dict(_LLAMA31, **_70B),
    "llama3.1-405b": dict(
        _LLAMA31, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, mlp_dim=53248
    ),
    "llama3.2-1b": dict(
        _LLAMA32, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_dim=8192, head_dim=64
    ),
    "llama3.2-3b": dict(
        _LLAMA32, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, mlp_dim=8192, head_dim=128
    ),
    "llama3.3-70b": dict(_LLAMA31, **_70B),
    # Small models for tests and the CPU demo.
    "tiny": dict(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=128,
        rope_theta=10000.0,
        max_seq_len=256,
    ),
    "small": dict(
        vocab_size=8000,
        dim=384,
        n_layers=6,
        n_heads=6,
        n_kv_heads=2,
        mlp_dim=1024,
        rope_theta=10000.0,
        max_seq_len=512,
    ),
}

# Published sizes, used by the tests (params, in units).
PUBLISHED_SIZES = {
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "llama3.1-8b": 8.03e9,
    "llama3.1-70b": 70.6e9,
    "llama3.1-405b": 405.9e9,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,
    "llama3.3-70b": 70.6e9,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Returns the preset `name` with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
