"""Compiled train-step memory by loss (full logits vs chunked) and remat policy, abstractly.

The train step is jitted exactly as the trainer does (donated state, AdamW, f32 master weights)
and compiled for abstract inputs (`jax.ShapeDtypeStruct`s from eval_shape): nothing the size of
the model is ever allocated, so the 1B preset at batch 8 x 2048 compiles on a laptop. Prints
XLA's `compile().memory_analysis()` for one device: arguments (params + optimizer state +
batch), temporaries (activations, logits, gradients) and their sum; the ratio column names its
denominator (the full-logits, no-remat row).

    python bench/bench_memory.py                      # llama3.2-1b, bf16, batch 8 x 2048
    python bench/bench_memory.py --preset tiny --batch 2 --seq 64 --policies none,full
    python bench/bench_memory.py --override n_layers=2 --policies full --full_logits_policies full

Numbers are from XLA:CPU's buffer assignment; a GPU's differs in fusion details, not in what
the chunked loss and remat save.
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import dataclasses
import functools
import time

GIB = 1024**3
MIB = 1024**2


def step_memory(
    preset: str, dtype: str, batch: int, seq: int, policy: str, chunk: int, overrides: dict
):
    """(argument bytes, temp bytes, output bytes, compile seconds) for one train step."""
    import jax
    import jax.numpy as jnp

    from llama_jax.model import sharding
    from llama_jax.model.config import get_config
    from llama_jax.training import experiment
    from llama_jax.training import step as training_step
    from llama_jax.training import trainer as T

    mc = get_config(preset, dtype=dtype, remat_policy=policy, **overrides)
    mc = dataclasses.replace(mc, max_seq_len=max(mc.max_seq_len, seq))
    c = experiment.base_config()
    c.batch_size, c.seq_len, c.loss_chunk_tokens = batch, seq, chunk
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, sched = T.make_tx(c, 1000)
    import flax.linen as nn

    abstract = jax.eval_shape(lambda: nn.unbox(T.init_state(mc, tx, 0)))
    boxed = jax.eval_shape(functools.partial(T.init_state, mc, tx, 0))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    bsh = sharding.batch_sharding(mesh)
    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    b = {
        "inputs": ints,
        "targets": ints,
        "segment_ids": ints,
        "positions": ints,
        "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32),
    }
    step = jax.jit(
        training_step.make_train_step(mc, tx, sched, c),
        in_shardings=(shardings, bsh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    t = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        compiled = step.lower(abstract, b).compile()
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes,
        m.temp_size_in_bytes,
        m.output_size_in_bytes,
        time.perf_counter() - t,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--policies", default="none,full,dots,dots_with_no_batch_dims,save_qkv_proj")
    p.add_argument("--chunk", type=int, default=1024, help="chunked loss: tokens per chunk")
    p.add_argument(
        "--full_logits_policies", default="none,full", help="policies for the plain loss"
    )
    p.add_argument("--override", default="", help="ModelConfig fields, e.g. n_layers=2")
    args = p.parse_args()
    from llama_jax.model.config import REMAT_POLICIES

    overrides = {}
    for item in filter(None, args.override.split(",")):
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"error: --override {item!r}; valid: integer fields, e.g. n_layers=2")
        overrides[key] = int(value)

    policies = [x for x in args.policies.split(",") if x]
    plain = [x for x in args.full_logits_policies.split(",") if x]
    for x in policies + plain:
        if x not in REMAT_POLICIES:
            raise SystemExit(f"error: remat policy {x!r}; valid: {', '.join(REMAT_POLICIES)}")
    rows = [("full logits", x, 0) for x in plain] + [
        (f"chunked {args.chunk}", x, args.chunk) for x in policies
    ]
    print(
        f"{args.preset} {args.override}, {args.dtype} compute, f32 params + AdamW, "
        f"batch {args.batch} x {args.seq}, one device; XLA memory_analysis of the train step"
    )
    unit, size = ("GiB", GIB) if args.preset != "tiny" else ("MiB", MIB)
    print(
        f"{'loss':<14} {'remat':<24} {'args ' + unit:>9} {'temp ' + unit:>9} "
        f"{'total ' + unit:>10} "
        f"{'vs 1st full logits':>20} {'compile s':>10}"
    )
    base = None
    for name, policy, chunk in rows:
        arg, temp, _, secs = step_memory(
            args.preset, args.dtype, args.batch, args.seq, policy, chunk, overrides
        )
        total = arg + temp
        base = base or (total if chunk == 0 else None)
        ratio = f"{total / base:.2f}x" if base else "-"
        print(
            f"{name:<14} {policy:<24} {arg / size:>9.2f} {temp / size:>9.2f} {total / size:>10.2f} "
            f"{ratio:>20} {secs:>10.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
