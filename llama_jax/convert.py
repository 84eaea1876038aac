"""Hugging Face / Meta checkpoints <-> llama_jax model directories.

Conversion streams tensor by tensor: safetensors files are memory-mapped (read without torch),
Meta `.pth` shards are opened with `torch.load(mmap=True, weights_only=True)`, and each
llama_jax parameter is filled one layer at a time into its stacked [L, ...] array, so the peak
is about one copy of the checkpoint.

Layouts (W is a PyTorch Linear weight [out, in]; ours are [in, out] split into heads):
  HF q_proj [N*H, D] -> wq [D, N, H]       HF o_proj [D, N*H] -> wo [N, H, D]
  HF gate/up [F, D]  -> w_gate/w_up [D, F] HF down [D, F]     -> w_down [F, D]
  Meta wq/wk rows are in interleaved rotary order; HF's are half-split (a fixed permutation).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
HF_EXTRA_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)

# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Reader of one `.safetensors` file: the header up front, each tensor read on demand.

    Tensors are read into fresh arrays (not memory-mapped), so a conversion holds only the
    tensors it is working on besides its output.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._offset = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        dtype = np.dtype(_ST_DTYPES[e["dtype"]])
        start, end = e["data_offsets"]
        count = (end - start) // dtype.itemsize
        a = np.fromfile(self.path, dtype=dtype, count=count, offset=self._offset + start)
        return a.reshape(e["shape"])


def write_safetensors(
    path: str, tensors: Iterator[tuple[str, np.ndarray]] | dict, metadata: dict | None = None
) -> None:
    """Writes tensors (name -> array, views welcome) to `path` atomically (temp, then rename).

    Each tensor is made contiguous only while it is written, one at a time.
    """
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, a in items:
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, a in items:
            np.ascontiguousarray(a).tofile(f)
    os.replace(tmp, path)


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
    return _with_param_dtype(config, params, compute=True), params


def save_hf(params: Any, config: ModelConfig, path: str, max_shard_bytes: int = 5 << 30) -> None:
    """Writes a directory that `transformers.LlamaForCausalLM.from_pretrained` loads.

    `params` is a params tree, or a `checkpoint.LazyParams` that reads one leaf at a time.
    """
    os.makedirs(path, exist_ok=True)
    hf = config.to_hf()  # torch_dtype: config.param_dtype, the dtype the params are stored in
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
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
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


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
    import pickle

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
    return _with_param_dtype(config, params, compute=True), params  # as for HF, above


def _with_param_dtype(config: ModelConfig, params: dict, compute: bool = False) -> ModelConfig:
    """config with param_dtype (and with `compute`, dtype too) set to the params' dtype."""
    import dataclasses

    dt = np.dtype(params["embedding"].dtype)
    name = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(
        dt, "float16" if dt == np.float16 else "float32"
    )
    if compute:
        return dataclasses.replace(config, param_dtype=name, dtype=name)
    return dataclasses.replace(config, param_dtype=name)


# ----------------------------------------------------------------------------- llama_jax dirs
def is_llama_jax_dir(path: str) -> bool:
    from llama_jax.checkpoint import PARAMS_DIR

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
            shutil.copyfile(p, os.path.join(dst, name))
            if name in TOKENIZER_FILES and found is None:
                found = name
    return found


def save_llama_jax(params: dict, config: ModelConfig, path: str, tokenizer_src: str | None) -> None:
    """Writes a llama_jax model directory: config.json, tokenizer file, params/ (orbax).

    The directory is assembled next to its destination and renamed into place, so a failed
    conversion never leaves a directory that looks complete.
    """
    from llama_jax.checkpoint import PARAMS_DIR, save_params

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
            copy_tokenizer(tokenizer_src, tmp, HF_EXTRA_FILES)  # the chat template travels
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_run_dir(path: str) -> bool:
    """A training run directory: a llama_jax config.json and committed checkpoints."""
    from llama_jax.checkpoint import committed_steps

    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    with open(os.path.join(path, "config.json")) as f:
        if json.load(f).get("format") != "llama_jax.ModelConfig":
            return False
    return bool(committed_steps(os.path.join(path, "checkpoints")))


def load_llama_jax(path: str) -> tuple[ModelConfig, dict]:
    """A llama_jax model directory, or a run directory's newest committed checkpoint."""
    from llama_jax.checkpoint import PARAMS_DIR, committed_steps, load_params

    with open(os.path.join(path, "config.json")) as f:
        config = ModelConfig.from_dict(json.load(f))
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return config, load_params(os.path.join(path, PARAMS_DIR))
    step = committed_steps(os.path.join(path, "checkpoints"))[-1]
    state = os.path.join(path, "checkpoints", str(step), "state")
    return config, load_params(state, subtree="params")


def load_any(path: str, dtype: Any | None = None) -> tuple[ModelConfig, dict]:
    """(config, numpy params) from a llama_jax, Hugging Face or Meta directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    from llama_jax import finetune

    if finetune.is_lora_run(path):  # its checkpoints hold adapters: merge them into the base
        return finetune.load_lora_run(path, dtype)
    if is_llama_jax_dir(path) or is_run_dir(path):
        config, params = load_llama_jax(path)
        if dtype is not None:
            import jax

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
        "model.safetensors[.index.json]) or a Meta directory (params.json + consolidated.*.pth)"
    )


def convert(input_dir: str, output_dir: str, fmt: str = "llama_jax", dtype: str | None = None):
    """`llama3 convert`: any supported directory -> llama_jax or Hugging Face format, or a LoRA
    run's adapters alone in PEFT's format ("peft")."""
    if fmt not in ("llama_jax", "hf", "peft"):
        raise ValueError(f"--format {fmt!r}; valid: 'llama_jax', 'hf', 'peft'")
    if fmt == "peft":
        from llama_jax.finetune import export_peft

        return export_peft(input_dir, output_dir)
    np_dtype = None
    if dtype is not None:
        valid = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
        if dtype not in valid:
            raise ValueError(f"--dtype {dtype!r}; valid: {sorted(valid)}")
        np_dtype = valid[dtype]
    if fmt == "hf" and np_dtype is None and is_llama_jax_dir(input_dir):
        # Stream leaf by leaf out of the orbax checkpoint.
        from llama_jax.checkpoint import PARAMS_DIR, LazyParams

        with open(os.path.join(input_dir, "config.json")) as f:
            config = ModelConfig.from_dict(json.load(f))
        save_hf(LazyParams(os.path.join(input_dir, PARAMS_DIR)), config, output_dir)
        copy_tokenizer(input_dir, output_dir, HF_EXTRA_FILES)
        return config
    config, params = load_any(input_dir, np_dtype)
    config = _with_param_dtype(config, params)
    if fmt == "llama_jax":
        save_llama_jax(params, config, output_dir, tokenizer_src=input_dir)
    else:
        save_hf(params, config, output_dir)
        copy_tokenizer(input_dir, output_dir, HF_EXTRA_FILES)
    return config
