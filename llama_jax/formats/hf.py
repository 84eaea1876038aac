"""Hugging Face checkpoints <-> llama_jax params, and the name map every format shares.

Conversion streams tensor by tensor: safetensors files are memory-mapped (read without torch),
and each llama_jax parameter is filled one layer at a time into its stacked [L, ...] array, so
the peak is about one copy of the checkpoint.

Layouts (W is a PyTorch Linear weight [out, in]; ours are [in, out] split into heads):
  HF q_proj [N*H, D] -> wq [D, N, H]       HF o_proj [D, N*H] -> wo [N, H, D]
  HF gate/up [F, D]  -> w_gate/w_up [D, F] HF down [D, F]     -> w_down [F, D]
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.atomic import write_atomic
from llama_jax.formats.safetensors import SafetensorsFile, write_safetensors
from llama_jax.model.config import ModelConfig

HF_EXTRA_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


# ----------------------------------------------------------------------------- the name map
def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _heads(shape: tuple[int, ...], split: int) -> tuple[tuple[int, ...], Callable, Callable]:
    """(our shape, HF -> ours, ours -> HF) for a Linear weight with one side split into heads:
    ours is the transpose of HF's, with our dims [:split] and [split:] flattened on HF's side."""

    def to_ours(w: np.ndarray) -> np.ndarray:
        return w.T.reshape(shape)

    def to_hf(w: np.ndarray) -> np.ndarray:
        return w.reshape(int(np.prod(w.shape[:split])), -1).T

    return shape, to_ours, to_hf


# (our path under params, HF name, our shape, HF->ours, ours->HF)
def _spec(c: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...], Callable, Callable]]:
    d, n, k, h, f, v = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
    p = "model.layers.{i}."
    specs = [
        (("embedding",), "model.embed_tokens.weight", (v, d), None, None),
        (("final_norm", "scale"), "model.norm.weight", (d,), None, None),
        (("layers", "attention_norm", "scale"), p + "input_layernorm.weight", (d,), None, None),
        (("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight", (d,), None, None),
        (("layers", "attention", "wq"), p + "self_attn.q_proj.weight", *_heads((d, n, h), 1)),
        (("layers", "attention", "wk"), p + "self_attn.k_proj.weight", *_heads((d, k, h), 1)),
        (("layers", "attention", "wv"), p + "self_attn.v_proj.weight", *_heads((d, k, h), 1)),
        (("layers", "attention", "wo"), p + "self_attn.o_proj.weight", *_heads((n, h, d), 2)),
        (("layers", "mlp", "w_gate"), p + "mlp.gate_proj.weight", (d, f), _t, _t),
        (("layers", "mlp", "w_up"), p + "mlp.up_proj.weight", (d, f), _t, _t),
        (("layers", "mlp", "w_down"), p + "mlp.down_proj.weight", (f, d), _t, _t),
    ]
    if not c.tie_embeddings:
        specs.append((("lm_head",), "lm_head.weight", (d, v), _t, _t))
    return specs


def _hf_shape(ours: tuple[int, ...], to_hf: Callable | None) -> tuple[int, ...]:
    if to_hf is None:
        return ours
    # A zero-stride view: the layout change is applied to shapes only, nothing is allocated.
    return to_hf(np.broadcast_to(np.zeros((), np.uint8), ours)).shape


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def tensors_to_params(
    get: Callable[[str], np.ndarray], config: ModelConfig, dtype: Any | None = None
) -> dict:
    """Builds the llama_jax params tree from a HF-named tensor getter, one tensor at a time.

    Raises:
      ValueError naming the parameter and both shapes when a tensor does not match config.
    """
    params: dict = {}
    for path, name, shape, to_ours, to_hf in _spec(config):
        per_layer = path[0] == "layers"
        names = [name.format(i=i) for i in range(config.n_layers)] if per_layer else [name]
        want = _hf_shape(shape, to_hf)
        out = None
        for i, nm in enumerate(names):
            w = get(nm)
            if tuple(w.shape) != tuple(want):
                raise ValueError(
                    f"tensor {nm} has shape {tuple(w.shape)} but the config "
                    f"({config.n_layers} layers, dim {config.dim}, heads {config.n_heads}/"
                    f"{config.n_kv_heads}, mlp {config.mlp_dim}, vocab {config.vocab_size}) "
                    f"expects {tuple(want)}"
                )
            w = to_ours(w) if to_ours else w
            if out is None:
                dt = np.dtype(dtype) if dtype is not None else w.dtype
                out = np.empty((len(names), *shape) if per_layer else shape, dt)
            if per_layer:
                out[i] = w
            else:
                out[...] = w
        _set(params, path, out)
    return params


def params_to_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array view in HF layout) for every tensor; nothing is copied."""
    for path, name, _, _, to_hf in _spec(config):
        value = np.asarray(_get(params, path))
        if path[0] == "layers":
            for i in range(config.n_layers):
                w = value[i]
                yield name.format(i=i), to_hf(w) if to_hf else w
        else:
            yield name, to_hf(value) if to_hf else value


# ----------------------------------------------------------------------------- Hugging Face
def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, "model.safetensors"))
        or os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    )


def read_hf_config(path: str, **overrides: Any) -> ModelConfig:
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    return ModelConfig.from_hf(hf, **overrides)


def hf_tensor_getter(path: str) -> Callable[[str], np.ndarray]:
    """name -> memory-mapped array over a single or sharded safetensors checkpoint."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(path, fn))]
        if missing:
            raise FileNotFoundError(
                f"{path}: the index names {len(files)} shards but {len(missing)} are missing: "
                f"{missing[:5]}"
            )
        readers = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in files}
        where = {name: readers[fn] for name, fn in weight_map.items()}
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        r = SafetensorsFile(os.path.join(path, "model.safetensors"))
        where = dict.fromkeys(r.keys(), r)
    else:
        bins = glob.glob(os.path.join(path, "*.bin"))
        hint = " (PyTorch .bin files found: re-save them as safetensors)" if bins else ""
        raise FileNotFoundError(f"{path}: no model.safetensors[.index.json]{hint}")

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise KeyError(f"{path}: the checkpoint has no tensor {name!r}")
        return where[name].get(name)

    return get


def load_hf(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face Llama directory into (config, numpy params tree)."""
    config = read_hf_config(path)
    get = hf_tensor_getter(path)
    params = tensors_to_params(get, config, dtype)
    # HF checkpoints record no compute dtype: compute in the weights' own (transformers'
    # dtype="auto" does the same), not in ModelConfig's float32 default.
    return with_param_dtype(config, params, compute=True), params


def save_hf(params: Any, config: ModelConfig, path: str, max_shard_bytes: int = 5 << 30) -> None:
    """Writes a directory that `transformers.LlamaForCausalLM.from_pretrained` loads.

    `params` is a params tree, or a `checkpoint.LazyParams` that reads one leaf at a time.
    """
    os.makedirs(path, exist_ok=True)
    hf = config.to_hf()  # torch_dtype: config.param_dtype, the dtype the params are stored in
    write_atomic(os.path.join(path, "config.json"), json.dumps(hf, indent=2))
    # Shards of at most max_shard_bytes; one file when it fits.
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, a in params_to_tensors(params, config):
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, a))
        size += a.nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, fn), shard)
        for name, a in shard:
            weight_map[name] = fn
            total += a.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(os.path.join(path, "model.safetensors.index.json"), json.dumps(index, indent=2))


def with_param_dtype(config: ModelConfig, params: dict, compute: bool = False) -> ModelConfig:
    """config with param_dtype (and with `compute`, dtype too) set to the params' dtype."""
    dt = np.dtype(params["embedding"].dtype)
    name = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(
        dt, "float16" if dt == np.float16 else "float32"
    )
    if compute:
        return dataclasses.replace(config, param_dtype=name, dtype=name)
    return dataclasses.replace(config, param_dtype=name)


def write_hf_token_files(path: str, config: ModelConfig, tokenizer: Any) -> None:
    """The model's own special ids in an exported directory, so transformers uses it as-is:
    `bos/eos/pad_token_id` in config.json (ModelConfig.to_hf writes Llama 3's 128000/128001),
    and, unless the source came with its own, `generation_config.json` (every stop id: chat
    turns end at end-of-turn) and `tokenizer_config.json` (special tokens, context length and
    the chat template where the tokenizer has one)."""
    ids = {v: k for k, v in tokenizer.special_tokens.items()}
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    hf["pad_token_id"] = tokenizer.pad_id
    write_atomic(cfg_path, json.dumps(hf, indent=2))
    stops = list(tokenizer.stop_ids)
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": tokenizer.pad_id,
        "max_length": config.max_seq_len,
    }
    if not os.path.isfile(os.path.join(path, "generation_config.json")):
        write_atomic(os.path.join(path, "generation_config.json"), json.dumps(generation, indent=2))
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        tok_cfg = {
            "bos_token": ids[tokenizer.bos_id],
            "eos_token": ids[tokenizer.eos_id],
            "pad_token": ids.get(tokenizer.pad_id) if tokenizer.pad_id is not None else None,
            "model_max_length": config.max_seq_len,
            "add_bos_token": True,
            "add_eos_token": False,
        }
        template = getattr(tokenizer, "chat_template", None)
        if template:
            tok_cfg["chat_template"] = template
        write_atomic(os.path.join(path, "tokenizer_config.json"), json.dumps(tok_cfg, indent=2))
