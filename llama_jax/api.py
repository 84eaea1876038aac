"""`Llama3`: the class users import to load, run, save (and later generate from) a model."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import convert, sampling, sharding, text_stream
from llama_jax.config import DTYPES, ModelConfig
from llama_jax.model import Transformer, init_params
from llama_jax.quantize import as_qweights, check_quantize, int8_dense, quantize_params


class Llama3:
    """A Llama 3 family model: config, params on device, tokenizer.

    Create with `Llama3.from_pretrained(path)` or `Llama3(model_path=path)`, where `path` is a
    llama_jax model directory, a Hugging Face directory or a Meta directory.
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
            that replaces the tokenizer's own template (or the built-in Llama 3 format) in
            `chat` and everywhere `tokenizer.encode_dialog` renders a dialog.
        """
        self._chat_template = None
        if chat_template is not None:  # read and compiled before the weights load
            from llama_jax.tokenizer.chat_template import read_template_file

            self._chat_template = read_template_file(chat_template)
        self.quantize = check_quantize(quantize)
        if dtype == "auto":
            dtype = None
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; valid: 'auto', {', '.join(map(repr, DTYPES))}")
        if (model_path is None) == (config is None):
            raise ValueError("give either model_path or config (with params), not both/neither")
        self.model_path = model_path
        if model_path is not None:
            np_dtype = None if dtype is None else jnp.dtype(dtype)
            config, params = convert.load_any(model_path, np_dtype)
        if adapter is not None:
            from llama_jax.finetune import apply_adapter

            params = apply_adapter(config, params, adapter)
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
        cast = jnp.dtype(config.param_dtype)
        self.params = jax.device_put(
            jax.tree.map(lambda a: np.asarray(a).astype(cast), params), self.param_shardings
        )
        self._tokenizer = tokenizer
        if tokenizer is not None and self._chat_template is not None:
            tokenizer.use_chat_settings(self._chat_template)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None, **kwargs: Any) -> Llama3:
        """Loads a llama_jax, Hugging Face, Meta or run directory, in its own dtype unless
        `dtype` says otherwise (see `__init__`)."""
        return cls(model_path=path, dtype=dtype, **kwargs)

    @staticmethod
    def _param_shardings(config: ModelConfig, mesh: Mesh) -> Any:
        abstract = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
        return sharding.logical_to_sharding(abstract, mesh)

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """The model directory's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from llama_jax.tokenizer import load_tokenizer

            if self.model_path is None:
                raise ValueError("this model was built in memory: pass tokenizer= to Llama3()")
            self._tokenizer = load_tokenizer(self.model_path)
            if self._chat_template is not None:
                self._tokenizer.use_chat_settings(self._chat_template)
        return self._tokenizer

    # ------------------------------------------------------------------ forward
    @functools.cached_property
    def _forward(self):
        if self.quantize:
            model = Transformer(self.config, int8_dense)
            with jax.set_mesh(self.mesh):
                qparams = jax.jit(quantize_params)(self.params)
                f = jax.jit(lambda p, t: model.apply({"params": as_qweights(p)}, t)[0])
            return lambda p, t: f(qparams if p is self.params else quantize_params(p), t)
        model = Transformer(self.config)
        with jax.set_mesh(self.mesh):
            return jax.jit(lambda p, t: model.apply({"params": p}, t)[0])

    def logits(self, tokens: Any) -> np.ndarray:
        """int tokens [B, T] (or [T]) -> float32 logits [B, T, V] as numpy."""
        tokens = np.asarray(tokens)
        squeeze = tokens.ndim == 1
        tokens = tokens[None] if squeeze else tokens
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"tokens must be an int array [B, T], got {tokens.dtype}{tokens.shape}"
            )
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(
                f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}"
            )
        import flax.linen as nn

        from llama_jax.sharding import LOGICAL_RULES

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            out = self._forward(self.params, jnp.asarray(tokens, jnp.int32))
        out = np.asarray(out, np.float32)
        return out[0] if squeeze else out

    # ------------------------------------------------------------------ sampling
    def sampler(self, **options: Any) -> sampling.Sampler:
        """The generation engine: decode-laid-out params (a second copy of the weights, made on
        first use and remade when `params` is replaced or `options` change) and its jitted
        prefill / decode functions.

        Args:
          **options: `layout`, `unroll`, `dtype`, `quantize` of `sampling.Sampler` (default:
            chosen for the platform, see `decode_layout.prepare_decode_params`; quantize as
            given to `Llama3`).
        """
        options = {"quantize": self.quantize, "vocab_limit": self._decodable_vocab(), **options}
        cached = getattr(self, "_sampler_cache", None)
        if cached is None or cached[0] is not self.params or cached[1] != options:
            self._sampler_cache = None  # let the old copy go before making the new one
            made = sampling.Sampler(self.config, self.params, self.mesh, **options)
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

    def scorer(self, **options: Any) -> Any:
        """The log-likelihood engine (`eval.scoring.Scorer`) over these params, made on first
        use and remade when `params` is replaced or `options` (max_batch_size,
        max_batch_bytes) change."""
        from llama_jax.eval.scoring import Scorer

        cached = getattr(self, "_scorer_cache", None)
        if cached is None or cached[0] is not self.params or cached[1] != options:
            made = Scorer(self.config, self.params, self.mesh, **options)
            self._scorer_cache = (self.params, dict(options), made)
        return self._scorer_cache[2]

    def evaluate(self, tasks: str | Sequence[str], **kwargs: Any) -> list[Any]:
        """Runs evaluation tasks (built-in names, or lm-eval tasks with lm-eval installed).

        Args:
          tasks: a name or a list of names (see `llama3 eval --list`).
          **kwargs: `include_path`, `num_fewshot`, `limit`, `seed`, `chat`, `batch_size`,
            `cache`, `progress` of `eval.runner.evaluate`.

        Returns:
          `eval.requests.Metric`s (task, name, value, stderr, n); `eval.runner.format_table`
          prints them.
        """
        from llama_jax.eval.runner import evaluate

        return evaluate(self, [tasks] if isinstance(tasks, str) else list(tasks), **kwargs)[0]

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is a {type(p).__name__}; generate takes strs")
        return [self.tokenizer.encode(p, bos=True) for p in prompts]

    def _default_stop_ids(self) -> tuple[int, ...]:
        if self._tokenizer is None and self.model_path is None:
            return ()
        from llama_jax.tokenizer import DIRECTORY_FILES

        found = self._tokenizer is not None or any(
            os.path.isfile(os.path.join(self.model_path, f)) for f in DIRECTORY_FILES
        )
        return tuple(self.tokenizer.stop_ids) if found else ()

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        truncate: bool = False,
    ) -> str | list[str]:
        """Continues text prompt(s) (BOS prepended); returns the new text only.

        Args:
          prompt: a string, or a list of strings generated together as one batch.
          max_new_tokens: at most this many new tokens per prompt.
          temperature, top_k, top_p, min_p: token choice (see `sampling.SamplingParams`);
            temperature 0 is greedy.
          seed: PRNG seed; the same seed and arguments give the same text.
          stop: string(s) that end a prompt's text (not included); generation also ends at the
            tokenizer's stop ids (end of text / turn / message).
          truncate: drop the oldest prompt tokens that would not fit the model's context,
            instead of raising.

        Returns:
          The continuation (a list of them for a list of prompts).
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("no prompts given: pass a string or a non-empty list of strings")
        params = sampling.SamplingParams(temperature, top_k, top_p, min_p)
        stop = text_stream.check_stop(stop)
        texts = text_stream.generate_text(
            self.sampler(),
            self.tokenizer,
            self._encode_prompts(prompts),
            max_new_tokens,
            params,
            seed,
            stop,
            self.tokenizer.stop_ids,
            truncate,
        )
        return texts[0] if single else texts

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        truncate: bool = False,
    ) -> list[list[int]]:
        """Continues token prompts (used as given: add BOS yourself); returns the new ids.

        Args:
          prompts: a list of token id lists, of any lengths.
          max_new_tokens, temperature, top_k, top_p, min_p, seed, truncate: as in `generate`.
          stop_ids: a prompt ends at the first of these (not included). None: the tokenizer's
            stop ids when the model has a tokenizer (passed in or in model_path), else none.

        Returns:
          The new ids of each prompt.
        """
        params = sampling.SamplingParams(temperature, top_k, top_p, min_p)
        stops = self._default_stop_ids() if stop_ids is None else tuple(stop_ids)
        return self.sampler().generate_ids(prompts, max_new_tokens, params, seed, stops, truncate)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        truncate: bool = False,
    ) -> Iterator[str]:
        """Yields the continuation of one prompt as text pieces, as they are produced.

        A piece never ends inside a multi-byte character, and the pieces join to what
        `generate` returns for the same arguments.

        Args:
          prompt: text (BOS prepended) or token ids (used as given, e.g. a chat dialog).
          max_new_tokens, temperature, top_k, top_p, min_p, seed, stop, truncate: as in
            `generate`.
        """
        params = sampling.SamplingParams(temperature, top_k, top_p, min_p)
        stop = text_stream.check_stop(stop)
        ids = self._encode_prompts([prompt])[0] if isinstance(prompt, str) else list(prompt)
        return text_stream.stream_text(
            self.sampler(),
            self.tokenizer,
            ids,
            max_new_tokens,
            params,
            seed,
            stop,
            self.tokenizer.stop_ids,
            truncate,
        )

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """The assistant's reply to a conversation, in the model's chat format (its own chat
        template, or the built-in Llama 3 format; see `Tokenizer.encode_dialog`).

        Args:
          messages: [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...].
          max_new_tokens, temperature, top_k, top_p, min_p, seed, stop: as in `generate`;
            the reply ends at the end of the turn (<|eot_id|>, <|im_end|>: a stop id of the
            tokenizer), which is not part of it.

        Returns:
          The reply text.
        """
        params = sampling.SamplingParams(temperature, top_k, top_p, min_p)
        ids = self.tokenizer.encode_dialog(messages)
        text_stream.check_dialog_fits(ids, max_new_tokens, self.config.max_seq_len)
        return text_stream.generate_text(
            self.sampler(),
            self.tokenizer,
            [ids],
            max_new_tokens,
            params,
            seed,
            text_stream.check_stop(stop),
            self.tokenizer.stop_ids,
        )[0]

    def score(self, texts: str | Sequence[str]) -> list[float]:
        """Log-likelihood of each text: the sum of log p(token | earlier tokens) over its tokens,
        with BOS prepended as context (for ranking candidates and evaluation).

        Args:
          texts: a string or a list of strings.

        Returns:
          One float per text (0.0 for an empty text).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given: pass a string or a non-empty list of strings")
        return self.sampler().score(self._encode_prompts(texts))

    # ------------------------------------------------------------------ saving
    def host_params(self) -> Any:
        """The params as host numpy arrays (gathered from every shard)."""
        return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), self.params)

    def save_pretrained(self, path: str, format: str = "llama_jax") -> None:
        """Writes a llama_jax model directory, or a Hugging Face one with format="hf"."""
        if format not in ("llama_jax", "hf"):
            raise ValueError(f"format={format!r}; valid: 'llama_jax', 'hf'")
        params = self.host_params()
        src = self.model_path if self.model_path and os.path.isdir(self.model_path) else None
        if format == "llama_jax":
            convert.save_llama_jax(params, self.config, path, tokenizer_src=src)
        else:
            convert.save_hf(params, self.config, path)
            if src:
                convert.copy_tokenizer(src, path, convert.HF_EXTRA_FILES)
