"""The tokenizer inside a GGUF file, built in memory as a Hugging Face `tokenizers` object.

GGUF stores the vocabulary as metadata (`tokenizer.ggml.*`):
  - `model = "gpt2"`: byte-level BPE. `tokens` are spelled in GPT-2's byte alphabet, `merges`
    are "left right" strings, and `pre` names the pre-tokenizer the merges were learned with
    (`llama-bpe`: Llama 3's regex; `smollm`: single digits, then GPT-2's regex; `gpt2`).
  - `model = "llama"`: SentencePiece-style BPE. `tokens` use "▁" for spaces, `scores` rank
    them (a higher score merges first), `token_type` marks control (3), user-defined (4) and
    byte (6, "<0x0A>") tokens; unknown bytes fall back to the byte tokens.
Control tokens become special tokens (never produced from plain text, as for every backend);
bos / eos / pad ids, `add_bos_token` and the chat template are taken as the file states them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llama_jax.gguf_file import GGUFContainer
from llama_jax.tokenizer.hf_json import HuggingFaceTokenizer
from llama_jax.tokenizer.tiktoken_bpe import LLAMA3_PATTERN

# GGML token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PRE_TOKENIZERS = ("llama-bpe", "llama3", "smollm", "gpt2", "default")
TOKENIZER_MODELS = ("gpt2", "llama")


def read_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `tokenizer.*` metadata and `general.architecture` of a GGUF file, as Python values."""
    meta = GGUFContainer(path).metadata
    return {
        k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"
    }


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list:
    # SentencePiece BPE keeps no merge list: a token is made by merging two shorter tokens, and
    # the merge that forms a higher-scored token comes first.
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for t, i in vocab.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], (left, right)))
    merges.sort()
    return [m[3] for m in merges]


def build_hf_tokenizer(meta: dict[str, Any], path: str = "<gguf>") -> Any:
    """A `tokenizers.Tokenizer` equivalent to the GGUF tokenizer metadata `meta`.

    Raises:
      ValueError: a tokenizer model or pre-tokenizer this backend does not build.
    """
    import tokenizers
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: "
            f"{', '.join(TOKENIZER_MODELS)}"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                f"{', '.join(PRE_TOKENIZERS)}"
            )
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        # Llama 3 (and llama.cpp for it) looks a whole pre-token up before merging.
        llama3 = pre in ("llama-bpe", "llama3")
        tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=llama3))
        if llama3:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    else:
        scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        vocab = {t: i for i, t in enumerate(tokens)}
        model = models.BPE(
            vocab,
            _merges_from_scores(tokens, scores, types),
            unk_token=tokens[int(unk_id)] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
        tok = tokenizers.Tokenizer(model)
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    control = [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == CONTROL
    ]
    user = [
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == USER_DEFINED
    ]
    tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok


class GGUFTokenizer(HuggingFaceTokenizer):
    """The tokenizer stored in a GGUF file's metadata.

    Attributes (besides `Tokenizer`'s):
      chat_template: the file's `tokenizer.chat_template`, or None.
      add_bos_token: whether the model expects `bos_id` at the start of a sequence.
      add_eos_token: whether the model expects `eos_id` at the end.
      metadata: the file's `tokenizer.*` metadata.
    """

    FORMAT = "gguf"
    FILE_NAME = "tokenizer.json"  # what `save` writes (with tokenizer_config.json)

    def __init__(self, path: str | os.PathLike, data: bytes | None = None) -> None:
        """Reads the tokenizer of a GGUF file.

        Args:
          path: the `.gguf` file.
          data: ignored (the file is memory-mapped, not read whole).
        """
        del data
        path = Path(path)
        meta = read_tokenizer_metadata(path)
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
        self.metadata = meta
        tokens = meta["tokenizer.ggml.tokens"]
        self._file_ids = {
            what: int(meta[f"tokenizer.ggml.{key}_token_id"])
            for what, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("eot", "eot"))
            if meta.get(f"tokenizer.ggml.{key}_token_id") is not None
        }
        for what, i in self._file_ids.items():
            if not 0 <= i < len(tokens):
                raise ValueError(f"{path}: {what} token id {i} is outside 0..{len(tokens) - 1}")
        hf = build_hf_tokenizer(meta, str(path))
        super().__init__(path, hf.to_str().encode("utf-8"))
        if "pad" in self._file_ids:
            self.pad_id = self._file_ids["pad"]
        stops = {self.eos_id, *(self._file_ids.get(k) for k in ("eot",) if k in self._file_ids)}
        self.stop_ids = tuple(sorted(set(self.stop_ids) | stops))
        self.use_chat_settings(  # the template sees the token texts the file names
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=tokens[self.bos_id],
            eos_token=tokens[self.eos_id],
        )
        default_bos = meta.get("tokenizer.ggml.model") == "llama"  # llama.cpp's default
        self.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos_token = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    def _find_special(self, candidates: Any, what: str) -> int:
        if what in self._file_ids:  # the file says which token it is
            return self._file_ids[what]
        return super()._find_special(candidates, what)

    def hf_tokenizer_json(self) -> str:
        """The tokenizer as a Hugging Face `tokenizer.json` string."""
        return self._tok.to_str()

    def tokenizer_config(self) -> dict[str, Any]:
        """A Hugging Face `tokenizer_config.json` for `hf_tokenizer_json` (special tokens by
        name, the chat template, add_bos/eos), so transformers loads the pair."""
        tokens = self.metadata["tokenizer.ggml.tokens"]
        names = {what: tokens[i] for what, i in self._file_ids.items()}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": names.get("bos", tokens[self.bos_id]),
            "eos_token": names.get("eos", tokens[self.eos_id]),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if "pad" in names:
            config["pad_token"] = names["pad"]
        unk = self.metadata.get("tokenizer.ggml.unknown_token_id")
        if unk is not None and self.metadata.get("tokenizer.ggml.model") == "llama":
            config["unk_token"] = tokens[int(unk)]
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `directory` (the GGUF file
        itself is not copied: it holds the whole model).

        Returns:
          The path of tokenizer.json.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self.hf_tokenizer_json(), encoding="utf-8")
        with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_config(), f, indent=2, ensure_ascii=False)
        return directory / "tokenizer.json"
