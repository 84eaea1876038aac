"""The lm-evaluation-harness backend: importing this module registers `llama_jax` with lm_eval.

    import lm_eval, llama_jax.eval.harness
    lm_eval.simple_evaluate(model="llama_jax", model_args="pretrained=PATH,dtype=float32",
                            tasks=[...], batch_size=8)

`PATH` is anything `Llama3.from_pretrained` reads (llama_jax, Hugging Face or Meta directory,
or a run directory). Requests are tokenised as lm-eval's own `hf` backend tokenises them for
the same tokenizer (lm-eval's `TemplateLM` splits context / continuation; BOS is added the way
the Hugging Face tokenizer would add it; special-token text in a prompt, e.g. from a chat
template, becomes the special id as in `transformers`), and scored by `eval.scoring.Scorer`
(batched, bucketed, shared contexts once). Generation runs on the `sampling.Sampler` and stops
where the `hf` backend stops: at the model's end-of-sequence ids (`generation_config.json` when
the directory has one, else the tokenizer's end of text), or at a stop string.

model_args: pretrained (required), dtype (float32 | bfloat16 | float16, default float32),
mesh_shape (e.g. `1x-1x1`, default one device), add_bos_token (default: what the tokenizer
file does; Llama 3: yes), max_length (default: the model's max_seq_len), seed (sampled
generation). `simple_evaluate`'s batch_size (an int: rows per forward pass; "auto": as many as
fit `max_batch_bytes`), max_batch_size and device (cpu | gpu | cuda | tpu) are accepted.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "llama_jax.eval.harness needs lm-evaluation-harness: pip install llama_jax[eval]"
    ) from e

from llama_jax.inference.loaded import LoadedModel
from llama_jax.inference.sampler import Generation, SamplingParams
from llama_jax.inference.scoring import rolling_windows
from llama_jax.model import sharding
from llama_jax.tokenizer.base import adds_bos

log = logging.getLogger("llama_jax.eval")

_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def _devices(device: str | None) -> list[jax.Device]:
    if device is None:
        return jax.devices()
    name = str(device).split(":")[0].lower()
    if name not in _PLATFORMS:
        raise ValueError(f"device={device!r}; valid: {', '.join(sorted(_PLATFORMS))}")
    try:
        return jax.devices(_PLATFORMS[name])
    except RuntimeError as e:
        raise ValueError(f"device={device!r}: JAX has no {_PLATFORMS[name]} devices ({e})") from e


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true/false, got {value!r}")
    return text in ("true", "1")


def generation_stop_ids(model_path: str | None, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids of `generation_config.json` (as `transformers.generate` uses), else
    the tokenizer's end of text."""
    path = os.path.join(model_path or "", "generation_config.json")
    if model_path and os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return (tokenizer.eos_id,)


@register_model("llama_jax")
class LlamaJaxLM(TemplateLM):
    """lm-eval model over a `LoadedModel` (see the module docstring for model_args)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = None,
        max_batch_size: int | str | None = None,
        device: str | None = None,
        mesh_shape: str | None = None,
        add_bos_token: bool | str | None = None,
        max_length: int | str | None = None,
        seed: int | str = 0,
        model: Any | None = None,
        max_batch_bytes: int | str = 1 << 29,
        **unused: Any,
    ):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("model_args needs pretrained=PATH (a model directory)")
            devices = _devices(device)
            if mesh_shape:
                shape = [int(s) for s in str(mesh_shape).replace(",", "x").split("x")]
                mesh = sharding.make_mesh(shape, devices)
            else:
                mesh = sharding.make_mesh((1, 1, 1), devices[:1])
            model = LoadedModel.from_pretrained(pretrained, dtype=dtype, mesh=mesh)
        self.llama = model
        self.tokenizer_obj = model.tokenizer
        rows = 64
        if batch_size is not None and not str(batch_size).startswith("auto"):
            if not str(batch_size).isdigit() or int(batch_size) < 1:
                raise ValueError(f"batch_size={batch_size!r}; valid: an int >= 1 or 'auto'")
            rows = int(batch_size)
        if max_batch_size is not None and str(max_batch_size).isdigit():
            rows = min(rows, max(1, int(max_batch_size)))
        self._batch_rows = rows
        self.scorer = model.scorer(max_batch_size=rows, max_batch_bytes=int(max_batch_bytes))
        self.add_bos = (
            adds_bos(self.tokenizer_obj) if add_bos_token is None else _as_bool(add_bos_token)
        )
        self._max_length = int(max_length) if max_length else model.config.max_seq_len
        if not 1 < self._max_length <= model.config.max_seq_len:
            raise ValueError(
                f"max_length={max_length}; valid: 2 to the model's max_seq_len "
                f"({model.config.max_seq_len})"
            )
        self.scorer.window = self._max_length
        self.stop_ids = generation_stop_ids(model.model_path, self.tokenizer_obj)
        self.seed = int(seed)
        self._special = set(self.tokenizer_obj.special_tokens.values())
        self._bos_text = self.tokenizer_obj.decode([self.tokenizer_obj.bos_id])

    # ------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_obj.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_obj.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_rows

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_obj.path).replace("/", "__")

    # ------------------------------------------------------------------ tokens
    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw
    ) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and string.startswith(self._bos_text):
            bos = False
        ids = self.tokenizer_obj.encode(string, bos=bos, allowed_special="all")
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self._special]
        return self.tokenizer_obj.decode(tokens)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama_jax loglikelihood")
        before = self.scorer.truncated
        results = self.scorer.loglikelihood(
            [(ctx, cont) for _, ctx, cont in requests],
            progress=lambda n: bar.update(n - bar.n),
        )
        bar.close()
        if self.scorer.truncated > before:
            log.warning(
                "%d request(s) longer than the window (%d tokens) were truncated on the left",
                self.scorer.truncated - before,
                self.max_length,
            )
        out = []
        for (key, _, _), r in zip(requests, results):
            answer = (r.logprob, r.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            # As the hf backend: the document is tok_encode'd (so BOS too, when the tokenizer
            # adds it) and predicted from prefix_token_id.
            for w in rolling_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length
            ):
                windows.append(w)
                owner.append(i)
        bar = tqdm(total=len(windows), disable=disable_tqdm, desc="llama_jax rolling windows")
        results = self.scorer.loglikelihood(windows, progress=lambda n: bar.update(n - bar.n))
        bar.close()
        totals = [0.0] * len(requests)
        for i, r in zip(owner, results):
            totals[i] += r.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama_jax generate_until")
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if not 0 < max_gen < self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_gen}; valid: 1 to {self.max_length - 1} (the model's "
                    "window must also hold the context)"
                )
            sampling = SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0))
                if kwargs.get("do_sample")
                else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            prompts = [
                self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                for i in idx
            ]
            for start in range(0, len(idx), self._batch_rows):
                rows = idx[start : start + self._batch_rows]
                texts = self._generate(prompts[start : start + len(rows)], max_gen, sampling, until)
                for i, text in zip(rows, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate(self, prompts, max_gen: int, sampling, until: list[str]) -> list[str]:
        """Greedy/sampled continuation of each prompt, cut before the first stop string (the
        text is decoded without special tokens, as the hf backend decodes it)."""
        gen = Generation(self.llama.sampler(), prompts, max_gen, sampling, self.seed, self.stop_ids)
        stops = [s for s in until if s]

        def text(r: int) -> str:
            t = self.tok_decode(gen.tokens[r])
            for s in stops:
                t = t.split(s)[0]
            return t

        while not gen.done:
            gen.advance(16)
            gen.stop(
                [
                    r
                    for r in range(len(prompts))
                    if not gen.finished[r] and len(text(r)) < len(self.tok_decode(gen.tokens[r]))
                ]
            )
        return [text(r) for r in range(len(prompts))]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The dialog in the model's chat format (`Tokenizer.encode_dialog`: its own template,
        else the built-in Llama 3 format), as text. Without a generation prompt (a task's
        `gen_prefix`), the final message stays open, as the hf backend's
        `continue_final_message=True` leaves it: no end of turn after it."""
        tok = self.tokenizer_obj
        ids = tok.encode_dialog(
            chat_history,
            add_generation_prompt,
            continue_final_message=not add_generation_prompt and bool(chat_history),
        )
        return tok.decode(ids)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return self.tokenizer_obj.chat_template or "llama3"
