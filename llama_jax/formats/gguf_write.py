"""llama_jax (config, params, tokenizer) -> a GGUF file that llama.cpp runs.

Tensors get llama.cpp's names (`formats.gguf.gguf_name`) and q/k rows its interleaved order
(`permute_qk`); norms stay float32, matrices take the chosen type (f32, f16, bf16 or q8_0,
quantised with `gguf.quants.quantize`). The tokenizer is written in GGUF form:
  - a GGUF file's own tokenizer: its metadata as it came;
  - Llama 3's tiktoken ranks: `gpt2` / `llama-bpe`, with merges recovered from the ranks;
  - a byte-level BPE `tokenizer.json`: `gpt2`, with the pre-tokenizer its split implies;
  - a SentencePiece model: `llama` (pieces, scores, token types).
The file is written next to its destination and renamed into place, so a failed export leaves
no partial `.gguf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import numpy as np

from llama_jax.formats.gguf import gguf_name, permute_qk
from llama_jax.formats.hf import params_to_tensors
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import rope_inv_freq
from llama_jax.tokenizer.base import adds_bos
from llama_jax.tokenizer.hf_json import _bytes_to_unicode

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# GGML token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _tiktoken_metadata(tok: Any) -> dict[str, Any]:
    spell = _bytes_to_unicode()
    ranks: dict[bytes, int] = tok._encoding._mergeable_ranks
    n = tok.vocab_size
    tokens = [""] * n
    types = [_NORMAL] * n
    for b, r in ranks.items():
        tokens[r] = "".join(spell[x] for x in b)
    # tiktoken keeps ranks, not merges. Every split of a token into two tokens is a merge,
    # ranked by the token it makes (as Hugging Face's converter does): some Llama 3 tokens
    # are made by no BPE path from the bytes, and ignore_merges (llama-bpe) looks them up whole.
    merges = []
    for b in sorted(ranks, key=ranks.__getitem__):
        splits = [(b[:k], b[k:]) for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
        for left, right in sorted(splits, key=lambda lr: (ranks[lr[0]], ranks[lr[1]])):
            merges.append("".join(spell[x] for x in left) + " " + "".join(spell[x] for x in right))
    for name, i in tok.special_tokens.items():
        tokens[i], types[i] = name, _CONTROL
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges}


def _hf_json_metadata(tok: Any) -> dict[str, Any]:
    data = json.loads(tok._tok.to_str())
    model = data["model"]
    if model.get("type") != "BPE" or not tok._byte_level:
        raise ValueError(
            f"{tok.path}: only byte-level BPE tokenizer.json files can be written to GGUF "
            f"(this one is {model.get('type')}, byte-level {tok._byte_level})"
        )
    n = tok.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_UNUSED] * n
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, _NORMAL
    for a in data.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = _CONTROL if a.get("special") else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(data.get("pre_tokenizer"))
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+" in pre:
        kind = "llama-bpe"
    elif '"Digits"' in pre:
        kind = "smollm"
    else:
        kind = "gpt2"
    return {"model": "gpt2", "pre": kind, "tokens": tokens, "types": types, "merges": merges}


def _spm_metadata(tok: Any) -> dict[str, Any]:
    sp = tok._sp
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(_UNKNOWN)
        elif sp.is_control(i):
            types.append(_CONTROL)
        elif sp.is_byte(i):
            types.append(_BYTE)
        elif sp.is_unused(i):
            types.append(_UNUSED)
        else:
            types.append(_NORMAL)
    # add_dummy_prefix is in the model's normalizer spec; what it does shows in one encoding.
    prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    return {
        "model": "llama",
        "tokens": tokens,
        "types": types,
        "scores": scores,
        "add_space_prefix": prefix,
    }


def tokenizer_metadata(tok: Any) -> dict[str, Any]:
    """The GGUF tokenizer description of any llama_jax tokenizer backend.

    Raises:
      ValueError: a tokenizer that GGUF cannot express (named, with what can).
    """
    fmt = getattr(tok, "FORMAT", None)
    if fmt == "gguf":
        m = tok.metadata
        meta = {
            "model": m["tokenizer.ggml.model"],
            "tokens": list(m["tokenizer.ggml.tokens"]),
            "types": list(m.get("tokenizer.ggml.token_type") or []),
        }
        keys = (("pre", "pre"), ("merges", "merges"), ("scores", "scores"))
        keys += (("add_space_prefix", "add_space_prefix"),)
        for key, name in keys:
            if f"tokenizer.ggml.{key}" in m:
                meta[name] = m[f"tokenizer.ggml.{key}"]
    elif fmt == "tiktoken":
        meta = _tiktoken_metadata(tok)
    elif fmt == "huggingface":
        meta = _hf_json_metadata(tok)
    elif fmt == "sentencepiece":
        meta = _spm_metadata(tok)
    else:
        raise ValueError(
            f"tokenizer {tok!r} (format {fmt!r}) cannot be written to GGUF; writable: a GGUF "
            "file's tokenizer, Llama 3 tiktoken, a byte-level BPE tokenizer.json, SentencePiece"
        )
    meta.update(
        bos=tok.bos_id,
        eos=tok.eos_id,
        pad=tok.pad_id,
        add_bos=adds_bos(tok),
        chat_template=getattr(tok, "chat_template", None),
    )
    return meta


def _write_tokenizer(w: Any, meta: dict[str, Any]) -> None:
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    if meta.get("types"):
        w.add_token_types(meta["types"])
    if meta.get("scores"):
        w.add_token_scores(meta["scores"])
    if meta.get("merges"):
        w.add_token_merges(meta["merges"])
    if "add_space_prefix" in meta:
        w.add_add_space_prefix(bool(meta["add_space_prefix"]))
    w.add_bos_token_id(int(meta["bos"]))
    w.add_eos_token_id(int(meta["eos"]))
    if meta.get("pad") is not None:
        w.add_pad_token_id(int(meta["pad"]))
    w.add_add_bos_token(bool(meta["add_bos"]))
    if meta.get("chat_template"):
        w.add_chat_template(meta["chat_template"])


def check_gguf_output(path: str) -> str:
    """The absolute path of a GGUF file to write, its directory made; checked before any
    weights are read.

    Raises:
      IsADirectoryError: `path` is a directory (a GGUF export is one file).
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"output {path!r} is a directory; a GGUF export is one file: give its path "
            f"(e.g. {os.path.join(path, 'model.gguf')!r})"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def save_gguf(
    params: Any,
    config: ModelConfig,
    path: str,
    tokenizer: Any,
    gguf_type: str = "f16",
    name: str | None = None,
) -> None:
    """Writes a llama-architecture GGUF file, atomically.

    Args:
      params: the params tree (numpy or jax arrays).
      config: its ModelConfig.
      path: the `.gguf` file to write.
      tokenizer: a llama_jax Tokenizer (written in GGUF form; see the module docstring).
      gguf_type: type of the matrices: one of GGUF_TYPES (norms stay float32).
      name: `general.name` (default: the file name).
    """
    import gguf  # deferred: the gguf package is only needed for GGUF files

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: this model has none to write")
    meta = tokenizer_metadata(tokenizer)  # fails before any tensor is converted
    if len(meta["tokens"]) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(meta['tokens'])} tokens but the model's vocabulary is "
            f"{config.vocab_size}"
        )
    meta["tokens"] += [f"[PAD{i}]" for i in range(len(meta["tokens"]), config.vocab_size)]
    if meta.get("types"):
        meta["types"] += [_UNUSED] * (config.vocab_size - len(meta["types"]))
    if meta.get("scores"):
        meta["scores"] += [0.0] * (config.vocab_size - len(meta["scores"]))
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    path = check_gguf_output(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name or os.path.splitext(os.path.basename(path))[0])
        w.add_file_type(
            {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]  # llama_ftype values
        )
        w.add_block_count(config.n_layers)
        w.add_context_length(config.max_seq_len)
        w.add_embedding_length(config.dim)
        w.add_feed_forward_length(config.mlp_dim)
        w.add_head_count(config.n_heads)
        w.add_head_count_kv(config.n_kv_heads)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_rope_dimension_count(config.head_dim)
        w.add_rope_freq_base(config.rope_theta)
        w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_vocab_size(config.vocab_size)
        _write_tokenizer(w, meta)
        if config.rope_scaling_factor is not None:
            plain = rope_inv_freq(dataclasses.replace(config, rope_scaling_factor=None))
            w.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(config)).astype(np.float32))
        for hf_name, a in params_to_tensors(params, config):
            a = np.asarray(a, np.float32)
            if hf_name.endswith("q_proj.weight"):
                a = permute_qk(a, config.n_heads)
            elif hf_name.endswith("k_proj.weight"):
                a = permute_qk(a, config.n_kv_heads)
            if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(gguf_name(hf_name), np.ascontiguousarray(a))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gguf_name(hf_name), np.ascontiguousarray(a, np.float16))
            else:
                q = gguf.quants.quantize(np.ascontiguousarray(a), qtype)
                w.add_tensor(gguf_name(hf_name), q, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp's 0600: another user (a server, ollama) could not read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
