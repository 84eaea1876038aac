"""Hugging Face PEFT LoRA adapter directories <-> llama_jax adapter trees.

A PEFT directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules)
and `adapter_model.safetensors` with, per layer i and module,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [R, in] and
`...lora_B.weight` [out, R]. Ours are A [*in, R] and B [R, *out] (see lora.py): the transpose,
with the head dims of q/k/v/o flattened in Hugging Face's order (head-major, as convert.py).
Only plain LoRA is read: DoRA, bias, per-module ranks, modules_to_save are refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from llama_jax.atomic import write_atomic
from llama_jax.formats.safetensors import SafetensorsFile, write_safetensors
from llama_jax.model.config import ModelConfig
from llama_jax.model.lora import _WHERE, TARGETS, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers.{i}."
HF_MODULE = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}
_FROM_HF = {v.split(".")[-1]: k for k, v in HF_MODULE.items()}  # q_proj -> wq
# Options whose non-default value changes what the adapter computes; refused when set.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "trainable_token_indices": None,
}


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _per_layer_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    d, n, k, h, f = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.mlp_dim
    return {  # target -> (in dims, out dims)
        "wq": ((d,), (n, h)),
        "wk": ((d,), (k, h)),
        "wv": ((d,), (k, h)),
        "wo": ((n, h), (d,)),
        "w_gate": ((d,), (f,)),
        "w_up": ((d,), (f,)),
        "w_down": ((f,), (d,)),
    }


def read_peft_config(path: str) -> tuple[LoraConfig, dict[str, Any]]:
    """(LoraConfig, the raw adapter_config.json) of a PEFT LoRA directory."""
    file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable adapter_config.json: {e}") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r}; only 'LORA' is supported")
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key)
        if value and value != default:
            raise ValueError(
                f"{file}: {key}={value!r} is not supported (only plain LoRA: {key} must be "
                f"{default!r})"
            )
    modules = raw.get("target_modules") or []
    if isinstance(modules, str):
        raise ValueError(f"{file}: target_modules is a regex ({modules!r}); give a list")
    unknown = [m for m in modules if m not in _FROM_HF]
    if unknown:
        raise ValueError(
            f"{file}: target_modules {unknown} are not Llama projections; valid: "
            f"{', '.join(_FROM_HF)}"
        )
    r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    if raw.get("use_rslora"):
        alpha = alpha * np.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
    targets = tuple(t for t in TARGETS if HF_MODULE[t].split(".")[-1] in modules)
    lora = LoraConfig(
        rank=r, alpha=alpha, dropout=float(raw.get("lora_dropout", 0.0)), targets=targets
    )
    return lora, raw


def load_peft(path: str, config: ModelConfig) -> tuple[LoraConfig, dict[str, Any]]:
    """Reads a PEFT LoRA directory as (LoraConfig, stacked float32 adapter tree) for `config`.

    Raises:
      ValueError naming the tensor when a shape does not fit `config` or a tensor is missing.
    """
    lora, _ = read_peft_config(path)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    st = SafetensorsFile(file)
    names = set(st.keys())
    shapes = _per_layer_shapes(config)
    r, n_layers = lora.rank, config.n_layers
    tree: dict[str, Any] = {}
    used = set()
    for t in lora.targets:
        ins, outs = shapes[t]
        a = np.empty((n_layers, *ins, r), np.float32)
        b = np.empty((n_layers, r, *outs), np.float32)
        for i in range(n_layers):
            base = PREFIX.format(i=i) + HF_MODULE[t]
            for part, want in (
                ("lora_A", (r, int(np.prod(ins)))),
                ("lora_B", (int(np.prod(outs)), r)),
            ):
                name = f"{base}.{part}.weight"
                if name not in names:
                    raise ValueError(
                        f"{file} has no tensor {name}: the adapter does not fit this base "
                        f"({n_layers} layers)"
                    )
                w = st.get(name)
                if tuple(w.shape) != want:
                    raise ValueError(
                        f"{file}: {name} has shape {tuple(w.shape)} but this base (dim "
                        f"{config.dim}, heads {config.n_heads}/{config.n_kv_heads}, mlp "
                        f"{config.mlp_dim}) with r={r} needs {want}: the adapter was made for "
                        "another base model"
                    )
                used.add(name)
                w = np.asarray(w, np.float32)
                if part == "lora_A":
                    a[i] = w.T.reshape(*ins, r)
                else:
                    b[i] = w.T.reshape(r, *outs)
        module = _WHERE[t][0]
        tree.setdefault("layers", {}).setdefault(module, {})[t] = {"a": a, "b": b}
    extra = sorted(names - used)
    if extra:
        raise ValueError(
            f"{file} holds tensors this base has no place for, e.g. {extra[0]} "
            f"({len(extra)} in all): the adapter was made for another base model"
        )
    return lora, tree


def save_peft(
    adapters: Any,
    lora: LoraConfig,
    config: ModelConfig,
    path: str,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes a PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads.

    Args:
      adapters: the stacked adapter tree (numpy or jax).
      lora: rank, alpha, dropout and targets.
      config: the base's ModelConfig (to check shapes and name layers).
      path: the output directory (new or empty).
      base_model_name_or_path: recorded in adapter_config.json.
    """
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"output directory {path} exists and is not empty")
    os.makedirs(path, exist_ok=True)
    items = []
    for t in lora.targets:
        ab = adapters["layers"][_WHERE[t][0]][t]
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(config.n_layers):
            base = PREFIX.format(i=i) + HF_MODULE[t]
            items.append((f"{base}.lora_A.weight", a[i].reshape(-1, lora.rank).T.copy()))
            items.append((f"{base}.lora_B.weight", b[i].reshape(lora.rank, -1).T.copy()))
    items.sort()
    write_safetensors(os.path.join(path, ADAPTER_WEIGHTS), items)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [HF_MODULE[t].split(".")[-1] for t in lora.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    write_atomic(os.path.join(path, ADAPTER_CONFIG), json.dumps(cfg, indent=2))
