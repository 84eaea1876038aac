"""Atomic file writes: a reader (or a rerun after a crash or a full disk) sees the previous file
or the new one, never a partial one, and no temporary file is left behind.

Every file a command produces goes through `write_atomic` (a tokenizer model, an export's
JSON files, eval results, a run's metadata). The bottom layer of the import contracts
(pyproject.toml): any package may use it, and it imports nothing of llama_jax.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> None:
    """Writes `data` to `path` through a temporary file in the same directory, fsynced and
    renamed over `path`; on any failure the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    blob = data.encode(encoding) if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make e.g. a served tokenizer unreadable
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a failed write(2)
            raise OSError(e.errno, e.strerror, path) from e  # names the file it was for
        raise
