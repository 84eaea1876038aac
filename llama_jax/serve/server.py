"""Running the app: `serve` (what `llama3 serve` calls) and `ServerThread` (tests, benchmarks)."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax

from llama_jax.inference.loaded import LoadedModel
from llama_jax.serve.app import ServeApp
from llama_jax.serve.engine import Engine


class ServerThread:
    """uvicorn serving `app` on host:port in a background thread (tests, benchmarks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **protocol: float):
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            **uvicorn_options(**protocol),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        for _ in range(600):  # bounded: up to 60 s
            if self.server.started:
                break
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            time.sleep(0.1)
        else:
            raise RuntimeError("the server did not start within 60 s")
        sock = self.server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def uvicorn_options(**protocol: float) -> dict[str, Any]:
    """uvicorn settings of every server: the guarded HTTP/1.1 protocol (read deadlines, a bound
    on connections still sending a request; see serve/connections.py) and a short keep-alive."""
    from llama_jax.serve.connections import guarded_protocol  # deferred: uvicorn is an extra

    return {"http": guarded_protocol(**protocol), "timeout_keep_alive": 5}


def check_port(host: str, port: int) -> None:
    """Raises ValueError if host:port cannot be bound (in use, or not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as e:
            in_use = e.errno == errno.EADDRINUSE
            raise ValueError(
                f"--port {port} on --host {host} "
                + ("is in use by another program; stop it or choose another --port"
                   if in_use else f"cannot be bound ({e.strerror}); valid: an address of this "
                   "machine (127.0.0.1: this machine only, 0.0.0.0: every interface)")
            ) from None  # fmt: skip


def _persistent_compile_cache() -> str:
    """Keeps XLA's compiled code on disk ($JAX_COMPILATION_CACHE_DIR, else
    ~/.cache/llama_jax/xla), so a restart loads the warm-up's shapes instead of compiling."""
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "llama_jax", "xla"
    )
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_seq_len: int | None = None,
    max_queue: int = 64,
    dtype: str | None = "auto",
    mesh_shape: Sequence[int] | None = None,
    model_name: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Loads `model_path`, compiles every shape, and serves until interrupted (dialogs in
    `chat_template`, a file, when given; else the model's own template)."""
    import uvicorn

    check_port(host, port)  # before minutes of loading and compiling
    cache_dir = _persistent_compile_cache()

    model = LoadedModel.from_pretrained(
        model_path, dtype=dtype, mesh_shape=mesh_shape, chat_template=chat_template
    )
    tokenizer = model.tokenizer
    engine = Engine(model.sampler(), max_batch, max_seq_len, max_queue)
    name = model_name or os.path.basename(os.path.normpath(model_path))
    t0 = time.time()
    print(
        f"compiling for {max_batch} slots x {engine.max_seq_len} tokens (each prompt bucket "
        "and batch size, once; no request compiles later) ...",
        flush=True,
    )
    engine.warmup()
    print(f"compiled code is cached in {cache_dir}: the next start is faster", flush=True)
    print(f"ready in {time.time() - t0:.1f}s: http://{host}:{port}/v1 serves {name!r}", flush=True)
    engine.start()
    app = ServeApp(engine, tokenizer, name, api_key)
    try:
        uvicorn.run(
            app, host=host, port=port, log_level="info", lifespan="off", **uvicorn_options()
        )
    finally:
        engine.close()
