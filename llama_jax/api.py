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
from llama_jax.formats.gguf_write import GGUF_TYPES, save_gguf
from llama_jax.inference import text_stream
from llama_jax.inference.loaded import LoadedModel
from llama_jax.inference.sampling_params import SamplingParams
from llama_jax.model.quantize import as_qweights, int8_dense, quantize_params
from llama_jax.model.sharding import LOGICAL_RULES
from llama_jax.model.transformer import Transformer
from llama_jax.tokenizer import DIRECTORY_FILES
from llama_jax.tokenizer.base import adds_bos


class Llama3(LoadedModel):
    """A Llama 3 family model: config, params on device, tokenizer, and text in / text out.

    Create with `Llama3.from_pretrained(path)` or `Llama3(model_path=path)`, where `path` is a
    llama_jax model directory, a Hugging Face or Meta directory, a GGUF file, or a built-in
    model name such as "smollm2-135m-instruct".
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
          `eval.requests.Metric`s (task, name, value, stderr, n); `eval.results.format_table`
          prints them.
        """
        return evaluate(self, [tasks] if isinstance(tasks, str) else list(tasks), **kwargs)[0]

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is a {type(p).__name__}; generate takes strs")
        bos = adds_bos(self.tokenizer)  # a GGUF says (SmolLM2's: no)
        return [self.tokenizer.encode(p, bos=bos) for p in prompts]

    def _default_stop_ids(self) -> tuple[int, ...]:
        if self._tokenizer is None and self.model_path is None:
            return ()
        found = (
            self._tokenizer is not None
            or formats.gguf.find_gguf(self.model_path) is not None
            or any(os.path.isfile(os.path.join(self.model_path, f)) for f in DIRECTORY_FILES)
        )
        return tuple(self.tokenizer.stop_ids) if found else ()

    def _sampling(self, sampling: SamplingParams | None, changes: dict[str, Any]) -> SamplingParams:
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        return (sampling or SamplingParams()).replace(**changes)

    def generate(
        self, prompt: str | Sequence[str], sampling: SamplingParams | None = None, **changes: Any
    ) -> str | list[str]:
        """Continues text prompt(s) (BOS prepended); returns the new text only.

        Args:
          prompt: a string, or a list of strings generated together as one batch.
          sampling: the settings (`SamplingParams`: greedy, 256 new tokens by default).
          **changes: fields of `SamplingParams` to change, e.g. `max_new_tokens=20,
            temperature=0.7`. Generation also ends at the tokenizer's stop ids (end of text /
            turn / message).

        Returns:
          The continuation (a list of them for a list of prompts).
        """
        sp = self._sampling(sampling, changes)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("no prompts given: pass a string or a non-empty list of strings")
        texts = text_stream.generate_text(
            self.sampler(),
            self.tokenizer,
            self._encode_prompts(prompts),
            sp.max_new_tokens,
            sp,
            sp.seed,
            sp.stop,
            self.tokenizer.stop_ids,
            sp.truncate,
        )
        return texts[0] if single else texts

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        stop_ids: Sequence[int] | None = None,
        **changes: Any,
    ) -> list[list[int]]:
        """Continues token prompts (used as given: add BOS yourself); returns the new ids.

        Args:
          prompts: a list of token id lists, of any lengths.
          sampling, **changes: as in `generate` (stop strings do not apply to ids).
          stop_ids: a prompt ends at the first of these (not included). None: the tokenizer's
            stop ids when the model has a tokenizer (passed in or in model_path), else none.

        Returns:
          The new ids of each prompt.
        """
        sp = self._sampling(sampling, changes)
        if sp.stop:
            raise ValueError("generate_ids ends at stop_ids; stop strings apply to text only")
        stops = self._default_stop_ids() if stop_ids is None else tuple(stop_ids)
        return self.sampler().generate_ids(
            prompts, sp.max_new_tokens, sp, sp.seed, stops, sp.truncate
        )

    def stream(
        self, prompt: str | Sequence[int], sampling: SamplingParams | None = None, **changes: Any
    ) -> Iterator[str]:
        """Yields the continuation of one prompt as text pieces, as they are produced.

        A piece never ends inside a multi-byte character, and the pieces join to what
        `generate` returns for the same settings.

        Args:
          prompt: text (BOS prepended) or token ids (used as given, e.g. a chat dialog).
          sampling, **changes: as in `generate`.
        """
        sp = self._sampling(sampling, changes)
        ids = self._encode_prompts([prompt])[0] if isinstance(prompt, str) else list(prompt)
        return text_stream.stream_text(
            self.sampler(),
            self.tokenizer,
            ids,
            sp.max_new_tokens,
            sp,
            sp.seed,
            sp.stop,
            self.tokenizer.stop_ids,
            sp.truncate,
        )

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        sampling: SamplingParams | None = None,
        **changes: Any,
    ) -> str:
        """The assistant's reply to a conversation, in the model's chat format.

        Args:
          messages: [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...].
          sampling, **changes: as in `generate`; the reply ends at the end of the turn (a stop
            id of the tokenizer: <|eot_id|>, <|im_end|>, ...), which is not part of it. The
            dialog is rendered by `tokenizer.encode_dialog` (the model's chat template, else the
            built-in Llama 3 format).

        Returns:
          The reply text.
        """
        sp = self._sampling(sampling, changes)
        ids = self.tokenizer.encode_dialog(messages)
        if not sp.truncate:
            text_stream.check_dialog_fits(ids, sp.max_new_tokens, self.config.max_seq_len)
        return text_stream.generate_text(
            self.sampler(),
            self.tokenizer,
            [ids],
            sp.max_new_tokens,
            sp,
            sp.seed,
            sp.stop,
            self.tokenizer.stop_ids,
            sp.truncate,
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
        seqs = self._encode_prompts(texts)
        scored = [i for i, ids in enumerate(seqs) if len(ids) > 1]
        results = self.scorer().loglikelihood([(seqs[i][:1], seqs[i][1:]) for i in scored])
        out = [0.0] * len(seqs)  # an empty text (BOS alone) has nothing to score
        for i, r in zip(scored, results):
            out[i] = r.logprob
        return out

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str, format: str = "llama_jax", gguf_type: str = "f16") -> None:
        """Writes a llama_jax model directory, a Hugging Face one with format="hf", or a GGUF
        file (llama.cpp; matrices in `gguf_type`: f32, f16, bf16, q8_0) with format="gguf"."""
        if format not in ("llama_jax", "hf", "gguf"):
            raise ValueError(f"format={format!r}; valid: 'llama_jax', 'hf', 'gguf'")
        if format == "gguf":
            if gguf_type not in GGUF_TYPES:
                raise ValueError(f"gguf_type={gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
            tokenizer = self.tokenizer  # before the gather: no tokenizer, no GGUF
            save_gguf(self.host_params(), self.config, path, tokenizer, gguf_type)
            return
        params = self.host_params()
        src = self.model_path if self.model_path and os.path.isdir(self.model_path) else None
        if format == "llama_jax":
            formats.save_llama_jax(params, self.config, path, tokenizer_src=src)
        else:
            formats.save_hf(params, self.config, path)
            if src:
                formats.copy_tokenizer(src, path, formats.HF_EXTRA_FILES)
