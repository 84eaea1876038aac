"""`Llama3`: the class users import to load, run, save (and later generate from) a model."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import formats
from llama_jax.eval.runner import evaluate
from llama_jax.inference import sampler, text_stream
from llama_jax.inference.loaded import LoadedModel
from llama_jax.model.quantize import as_qweights, int8_dense, quantize_params
from llama_jax.model.sharding import LOGICAL_RULES
from llama_jax.model.transformer import Transformer
from llama_jax.tokenizer import DIRECTORY_FILES


class Llama3(LoadedModel):
    """A Llama 3 family model: config, params on device, tokenizer, and text in / text out.

    Create with `Llama3.from_pretrained(path)` or `Llama3(model_path=path)`, where `path` is a
    llama_jax model directory, a Hugging Face directory or a Meta directory.
    """

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
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            out = self._forward(self.params, jnp.asarray(tokens, jnp.int32))
        out = np.asarray(out, np.float32)
        return out[0] if squeeze else out

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
        return evaluate(self, [tasks] if isinstance(tasks, str) else list(tasks), **kwargs)[0]

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is a {type(p).__name__}; generate takes strs")
        return [self.tokenizer.encode(p, bos=True) for p in prompts]

    def _default_stop_ids(self) -> tuple[int, ...]:
        if self._tokenizer is None and self.model_path is None:
            return ()
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
          temperature, top_k, top_p, min_p: token choice (see `sampler.SamplingParams`);
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
        params = sampler.SamplingParams(temperature, top_k, top_p, min_p)
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
        params = sampler.SamplingParams(temperature, top_k, top_p, min_p)
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
        params = sampler.SamplingParams(temperature, top_k, top_p, min_p)
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
        """The assistant's reply to a conversation, in the Llama 3 chat format.

        Args:
          messages: [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...].
          max_new_tokens, temperature, top_k, top_p, min_p, seed, stop: as in `generate`;
            the reply ends at <|eot_id|> (or another stop id of the tokenizer).

        Returns:
          The reply text.
        """
        params = sampler.SamplingParams(temperature, top_k, top_p, min_p)
        ids = self.tokenizer.encode_dialog(messages)
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
    def save_pretrained(self, path: str, format: str = "llama_jax") -> None:
        """Writes a llama_jax model directory, or a Hugging Face one with format="hf"."""
        if format not in ("llama_jax", "hf"):
            raise ValueError(f"format={format!r}; valid: 'llama_jax', 'hf'")
        params = self.host_params()
        src = self.model_path if self.model_path and os.path.isdir(self.model_path) else None
        if format == "llama_jax":
            formats.save_llama_jax(params, self.config, path, tokenizer_src=src)
        else:
            formats.save_hf(params, self.config, path)
            if src:
                formats.copy_tokenizer(src, path, formats.HF_EXTRA_FILES)
