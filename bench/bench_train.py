"""Training throughput: llama_jax's train_step against Hugging Face transformers + torch AdamW.

Side by side in one run, same architecture, float32, AdamW:
  - the ~50M model of PERF_NOTES (vocab 32000, d 512, 8 layers, 8/2 heads, MLP 1536, seq 256,
    batch 8) and the README demo model;
  - MFU against a measured float32 matmul peak (4096^2 jnp.dot), with
    FLOPs/token = 6 x matmul params + 12 x L x T x N x H (causal attention not halved);
  - the step time with 8 fake devices (fsdp=8) against 1, in a subprocess (device count is fixed
    when JAX starts), so sharding overhead is visible.

    python bench/bench_train.py [--steps 6] [--skip_torch] [--skip_devices]
        [--models 50M,demo] [--chunks 1024,0]   (chunked vs full-logits loss, same run)
Prints numbers and ratios; never asserts on time.
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from shapes import SMALL_50M  # noqa: E402  (bench/)

MODELS = {
    "50M": dict(SMALL_50M, max_seq_len=256),
}


def demo_model():
    from llama_jax.training import experiment

    c = experiment.load_config(
        os.path.join(os.path.dirname(__file__), "..", "experiments", "shakespeare_tiny.py")
    )
    fields = c.model.to_dict()
    return fields, c.batch_size, c.seq_len


def matmul_peak() -> float:
    import jax
    import jax.numpy as jnp

    n = 4096
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def jax_step_time(
    fields: dict, batch: int, seq: int, steps: int, mesh_shape=(1, 1, 1), chunk_tokens=None
):
    import flax.linen as nn
    import jax

    from llama_jax.model import sharding
    from llama_jax.model.config import ModelConfig
    from llama_jax.training import experiment
    from llama_jax.training import step as training_step
    from llama_jax.training import trainer as T

    c = experiment.base_config()
    mc = ModelConfig(**{**fields, "max_seq_len": max(fields.get("max_seq_len", seq), seq)})
    c.batch_size, c.seq_len = batch, seq
    if chunk_tokens is not None:
        c.loss_chunk_tokens = chunk_tokens
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    tx, sched = T.make_tx(c, 1000)
    abstract = jax.eval_shape(functools.partial(T.init_state, mc, tx, 0))
    shardings = sharding.logical_to_sharding(abstract, mesh)
    bsh = sharding.batch_sharding(mesh)
    step = jax.jit(
        training_step.make_train_step(mc, tx, sched, c),
        in_shardings=(shardings, bsh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    rng = np.random.RandomState(0)
    b = {
        "inputs": rng.randint(0, mc.vocab_size, (batch, seq)).astype(np.int32),
        "targets": rng.randint(0, mc.vocab_size, (batch, seq)).astype(np.int32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    b = jax.device_put(b, bsh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state = jax.jit(lambda: nn.unbox(T.init_state(mc, tx, 0)), out_shardings=shardings)()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = step(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    return statistics.median(times), mc


def torch_step_time(fields: dict, batch: int, seq: int, steps: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=fields["vocab_size"],
        hidden_size=fields["dim"],
        num_hidden_layers=fields["n_layers"],
        num_attention_heads=fields["n_heads"],
        num_key_value_heads=fields["n_kv_heads"],
        intermediate_size=fields["mlp_dim"],
        max_position_embeddings=max(seq, fields.get("max_seq_len", seq)),
        tie_word_embeddings=fields.get("tie_embeddings", False),
        rope_parameters={"rope_type": "default", "rope_theta": fields.get("rope_theta", 5e5)},
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def devices_child(steps: int) -> None:
    """Run in a subprocess with 8 fake devices: prints JSON {mesh: seconds}."""
    fields = MODELS["50M"]
    out = {}
    for shape in [(1, 1, 1), (1, 8, 1), (8, 1, 1), (2, 2, 2)]:
        t, _ = jax_step_time(fields, 8, 256, steps, shape)
        out[str(shape)] = t
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="50M,demo", help="comma-separated: 50M, demo")
    p.add_argument(
        "--chunks", default="1024,0", help="loss_chunk_tokens values to time (0 = full logits)"
    )
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--skip_devices", action="store_true")
    p.add_argument("--devices_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.devices_child:
        devices_child(args.steps)
        return
    import jax

    peak = matmul_peak()
    print(
        f"jax {jax.__version__}, {jax.device_count()} device(s); float32 matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s (4096^2 jnp.dot)"
    )
    fields, batch, seq = demo_model()
    known = {"50M": (MODELS["50M"], 8, 256), "demo": (fields, batch, seq)}
    names = args.models.split(",")
    for n in names:
        if n not in known:
            raise SystemExit(f"error: --models {n!r}; valid: {', '.join(known)}")
    chunks = [int(x) for x in args.chunks.split(",")]
    print(
        "MFU = tokens/s x FLOPs/token (6 x matmul params + 12 L T N H) / the measured peak; "
        "ratio = llama_jax tok/s / torch tok/s (both float32)"
    )
    print(
        f"\n{'model':<6} {'params':>8} {'B x T':>9} {'loss':>12} {'llama_jax tok/s':>16} "
        f"{'MFU':>6} {'torch tok/s':>12} {'MFU':>6} {'ratio':>6}"
    )
    for name in names:
        f, b, t = known[name]
        tokens = b * t
        ttps = None
        if not args.skip_torch:
            ttps = tokens / torch_step_time(f, b, t, args.steps)
        for chunk in chunks:
            jt, mc = jax_step_time(f, b, t, args.steps, chunk_tokens=chunk)
            flops = mc.flops_per_token(t)
            jtps = tokens / jt
            loss = f"chunk {chunk}" if chunk else "full logits"
            row = (
                f"{name:<6} {mc.param_count() / 1e6:>7.1f}M {b:>4}x{t:<4} {loss:>12} "
                f"{jtps:>16.0f} {jtps * flops / peak:>6.1%}"
            )
            if ttps is not None:
                row += f" {ttps:>12.0f} {ttps * flops / peak:>6.1%} {jtps / ttps:>5.2f}x"
            print(row, flush=True)
    if not args.skip_devices:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        res = subprocess.run(
            [sys.executable, __file__, "--devices_child", "--steps", str(args.steps)],
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode:
            print(res.stderr[-2000:])
            return
        times = json.loads(res.stdout.strip().splitlines()[-1])
        base = times["(1, 1, 1)"]
        print(
            "\n50M model, 8 fake CPU devices (same 2 cores): step time by mesh (data, fsdp, tensor)"
        )
        for shape, t in times.items():
            print(f"  {shape:<10} {t * 1000:8.0f} ms  {t / base:5.2f}x of 1 device")


if __name__ == "__main__":
    main()
