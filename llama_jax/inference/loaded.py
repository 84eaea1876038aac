"""A model loaded for inference: config, params placed on a mesh, tokenizer, and its engines.

`LoadedModel` is what every consumer of a trained model starts from: the `Llama3` class users
import (api.py) adds text-in/text-out conveniences on top of it; the lm-eval backend, the
evaluator and the server take one directly. It owns loading (any format, through
`formats.load_any`), dtype casting, LoRA adapters merged on load, placement on the mesh, and
the two engines over the placed params: the `Sampler` (generation) and the `Scorer`
(log-likelihoods), each made on first use and remade when the params change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import formats
from llama_jax.data.builtin_models import resolve_model_path
from llama_jax.inference.sampler import Sampler
from llama_jax.inference.scoring import Scorer
from llama_jax.model import sharding
from llama_jax.model.config import DTYPES, ModelConfig
from llama_jax.model.quantize import check_quantize
from llama_jax.model.transformer import init_params
from llama_jax.tokenizer import load_tokenizer
from llama_jax.tokenizer.chat_template import read_template_file


class LoadedModel:
    """A Llama 3 family model ready for inference: config, params on device, tokenizer.

    Create with `LoadedModel.from_pretrained(path)` (or `Llama3.from_pretrained`), where `path`
    is anything `formats.load_any` reads, or from an in-memory (config, params) pair.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        config: ModelConfig | None = None,
        params: Any | None = None,
        dtype: str | None = None,
        mesh: Mesh | None = None,
        mesh_shape: Sequence[int] | None = None,
        tokenizer: Any | None = None,
        adapter: str | None = None,
        quantize: str | None = None,
        chat_template: str | None = None,
    ):
        """Loads `model_path`, or wraps an in-memory (config, params) pair.

        Args:
          model_path: a model directory (llama_jax, Hugging Face or Meta).
          config, params: an in-memory model instead of a path (params may be numpy or jax).
          dtype: parameter and compute dtype ("float32", "bfloat16", "float16"); None or "auto"
            (the default, like transformers' dtype="auto") keeps the checkpoint's own dtypes.
          mesh / mesh_shape: where the params live; default one device. mesh_shape is
            (data, fsdp, tensor) over all devices, one entry may be -1.
          tokenizer: a `llama_jax.tokenizer.Tokenizer`; by default the tokenizer file found in
            `model_path`, loaded on first use.
          adapter: a PEFT LoRA directory or a llama_jax LoRA run, merged into the base weights
            (checked to fit the base).
          quantize: "int8" runs generation, scoring and `logits` with int8 projection weights
            and per-channel scales (quantize.py); None (default) uses the weights as loaded.
          chat_template: a jinja2 chat template file (or a tokenizer_config.json holding one)
            used instead of the tokenizer's own template (or the built-in Llama 3 format)
            wherever `tokenizer.encode_dialog` renders a dialog (`--chat_template FILE`).
        """
        self._chat_template = None
        if chat_template is not None:  # read and compiled before the weights load
            self._chat_template = read_template_file(chat_template)
        self.quantize = check_quantize(quantize)
        if dtype == "auto":
            dtype = None
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; valid: 'auto', {', '.join(map(repr, DTYPES))}")
        if (model_path is None) == (config is None):
            raise ValueError("give either model_path or config (with params), not both/neither")
        if model_path is not None:  # a built-in name ("smollm2-135m-instruct") -> its file
            model_path = resolve_model_path(model_path, "model_path")
        self.model_path = model_path
        if model_path is not None:
            np_dtype = None if dtype is None else jnp.dtype(dtype)
            config, params = formats.load_any(model_path, np_dtype)
        if adapter is not None:
            params = formats.apply_adapter(config, params, adapter)
        elif params is None:
            raise ValueError("config was given without params")
        if dtype is not None:
            config = dataclasses.replace(config, param_dtype=dtype, dtype=dtype)
        if mesh is None:
            mesh = (
                sharding.make_mesh((1, 1, 1), jax.devices()[:1])
                if mesh_shape is None
                else sharding.make_mesh(mesh_shape)
            )
        sharding.check_model_fits_mesh(config, mesh)
        self.config: ModelConfig = config
        self.mesh = mesh
        self.param_shardings = self._param_shardings(config, mesh)
        leaves, treedef = jax.tree.flatten(params)
        params = None  # so that _place can free each host leaf once it is placed
        self.params = self._place(leaves, treedef, jnp.dtype(config.param_dtype))
        self._tokenizer = tokenizer
        if tokenizer is not None and self._chat_template is not None:
            tokenizer.use_chat_settings(self._chat_template)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None, **kwargs: Any) -> LoadedModel:
        """Loads a llama_jax, Hugging Face, Meta or run directory, in its own dtype unless
        `dtype` says otherwise (see `__init__`)."""
        return cls(model_path=path, dtype=dtype, **kwargs)

    def _place(self, leaves: list, treedef: Any, cast: np.dtype) -> Any:
        """The params' `leaves` cast to `cast` and placed with `param_shardings`, one at a
        time: each host leaf is dropped from `leaves` once it is on the device, so a load peaks
        near one copy of the model (plus a leaf) rather than three (host tree, its cast, device
        tree). Leaves the caller still holds are not freed, of course."""
        placed = []
        for i, sh in enumerate(treedef.flatten_up_to(self.param_shardings)):
            host = np.asarray(leaves[i]).astype(cast, copy=False)  # no copy when already cast
            leaves[i] = None
            placed.append(jax.device_put(host, sh).block_until_ready())  # then host can go
        return jax.tree.unflatten(treedef, placed)

    @staticmethod
    def _param_shardings(config: ModelConfig, mesh: Mesh) -> Any:
        abstract = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
        return sharding.logical_to_sharding(abstract, mesh)

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """The model directory's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            if self.model_path is None:
                raise ValueError("this model was built in memory: pass tokenizer= to Llama3()")
            self._tokenizer = load_tokenizer(self.model_path)
            if self._chat_template is not None:
                self._tokenizer.use_chat_settings(self._chat_template)
        return self._tokenizer

    # ------------------------------------------------------------------ sampling
    def sampler(self, **options: Any) -> Sampler:
        """The generation engine: decode-laid-out params (a second copy of the weights, made on
        first use and remade when `params` is replaced or `options` change) and its jitted
        prefill / decode functions.

        Args:
          **options: `layout`, `unroll`, `dtype`, `quantize`, `decode_chunk` of `Sampler`
            (default: chosen for the platform, see `decode_layout.prepare_decode_params` and
            `sampler.DECODE_CHUNK`; quantize as given to `Llama3`).
        """
        options = {"quantize": self.quantize, "vocab_limit": self._decodable_vocab(), **options}
        cached = getattr(self, "_sampler_cache", None)
        if cached is None or cached[0] is not self.params or cached[1] != options:
            self._sampler_cache = None  # let the old copy go before making the new one
            made = Sampler(self.config, self.params, self.mesh, **options)
            self._sampler_cache = (self.params, dict(options), made)
        return self._sampler_cache[2]

    def _decodable_vocab(self) -> int | None:
        """The tokenizer's id count, when there is a tokenizer (the sampler never draws past
        it); None for an in-memory model without one."""
        if self._tokenizer is None and self.model_path is None:
            return None
        try:
            return int(self.tokenizer.vocab_size)
        except (ValueError, OSError):
            return None

    def scorer(self, **options: Any) -> Scorer:
        """The log-likelihood engine (`inference.scoring.Scorer`, the one every score goes
        through) over these params, made on first use and remade when `params` is replaced or
        `options` (max_batch_size, max_batch_bytes, quantize) change; int8 as given to the
        model unless `quantize` says otherwise."""
        options = {"quantize": self.quantize, **options}
        cached = getattr(self, "_scorer_cache", None)
        if cached is None or cached[0] is not self.params or cached[1] != options:
            made = Scorer(self.config, self.params, self.mesh, **options)
            self._scorer_cache = (self.params, dict(options), made)
        return self._scorer_cache[2]

    def host_params(self) -> Any:
        """The params as host numpy arrays (gathered from every shard)."""
        return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), self.params)
