"""Fine-tuning side by side: llama_jax LoRA, llama_jax full fine-tune, peft + transformers LoRA.

Each job runs in its own process (so its peak memory is its own) on one CPU device: a random
model of the chosen shape, random tokens with every position trained, AdamW, LoRA rank `--rank`
(alpha 2r) on all seven projections. Printed per job, then as ratios that name their
denominators (the goals of issue 10: LoRA tokens/s >= 1.5x peft's; LoRA optimizer state <= 2%
of the full fine-tune's):
  - optimizer-state bytes (ours: the AdamW moments the trainer keeps; peft: torch AdamW's state
    after one step) and XLA's compiled memory of our train step (arguments + temporaries +
    unaliased outputs). Both are independent of machine load: `--memory` measures only these,
    compiling abstractly (nothing the size of the model is allocated for our jobs);
  - without `--memory`: tokens/s over `--steps` timed steps after 2 warm-up steps, and peak
    resident memory (ru_maxrss) of the job's process.

Sizes: `50m` is bench_train.py's ~57M model (vocab 32000, d 512, 8 layers, 8 / 2 heads, MLP
1536, untied); `1b` the llama3.2-1b preset (tied, vocab 128256), base and compute in bfloat16
(full fine-tune: float32 master weights, bf16 compute), `--layers N` keeps its first N layers.

    python bench/bench_finetune.py --size tiny --steps 2                 # smoke test, a minute
    python bench/bench_finetune.py --size 50m --memory                   # bytes only, ~1 min
    python bench/bench_finetune.py --size 1b --memory                    # bytes only, ~3 min
    python bench/bench_finetune.py --size 50m --batch 4 --seq 256 --steps 5
    python bench/bench_finetune.py --size 1b --layers 2 --batch 1 --seq 256 --steps 3
"""

from __future__ import annotations

# Before jax: an installed libtpu / CUDA plugin (the tpu and gpu-plan extras) stays out of
# CPU runs, as in `llama3` (llama_jax/tpu_plugin.py, cuda_plugin.py).
import llama_jax  # noqa: F401

# isort: split

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from shapes import SMALL_50M  # noqa: E402  (bench/)

MIB = 2**20
SIZES = {  # name -> (preset, ModelConfig overrides)
    "tiny": (
        "tiny",
        dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=192),
    ),
    "50m": (
        "tiny",
        dict(SMALL_50M, tie_embeddings=False),
    ),
    "1b": ("llama3.2-1b", {}),
}
JOBS = ("jax_lora", "jax_full", "peft_lora")


def model_config(args):
    from llama_jax.model.config import get_config

    preset, fields = SIZES[args.size]
    fields = dict(fields, max_seq_len=max(args.seq, 256), dtype=args.base_dtype)
    if args.layers:
        fields["n_layers"] = args.layers
    return get_config(preset, **fields)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jax(args, lora_on: bool) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from llama_jax.model import lora
    from llama_jax.model.transformer import init_params
    from llama_jax.training import step as training_step
    from llama_jax.training import trainer as train
    from llama_jax.training.experiment import base_config

    cfg = model_config(args)
    c = base_config()
    c.num_steps, c.warmup_steps, c.weight_decay = args.steps + 2, 1, 0.0
    c.lora.rank = args.rank if lora_on else 0
    c.lora.alpha = 2.0 * args.rank
    c = ml_collections.ConfigDict(c)
    tx, schedule = train.make_tx(c, c.num_steps)
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank) if lora_on else None
    dt = jnp.dtype(args.base_dtype)
    make_state = lambda: nn.unbox(train.init_state(cfg, tx, 0, lcfg))  # noqa: E731
    make_base = lambda: jax.tree.map(  # noqa: E731
        lambda a: a.astype(dt), nn.unbox(init_params(cfg, jax.random.key(0)))
    )
    state_abs = jax.eval_shape(make_state)
    base_abs = jax.eval_shape(make_base) if lora_on else {}
    b, t = args.batch, args.seq
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch_abs = dict(inputs=ints, targets=ints, segment_ids=ints, positions=ints)
    batch_abs["loss_mask"] = jax.ShapeDtypeStruct((b, t), jnp.float32)
    step = jax.jit(training_step.make_train_step(cfg, tx, schedule, c, lcfg), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state_abs, batch_abs, base_abs).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # noqa: E731
    out = {
        "optimizer_bytes": nbytes(state_abs["opt_state"]),
        "trainable": int(sum(x.size for x in jax.tree.leaves(state_abs["params"]))),
        "base_bytes": nbytes(base_abs) if lora_on else nbytes(state_abs["params"]),
        "compiled_bytes": int(
            m.argument_size_in_bytes
            + m.temp_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
        ),
        "compiled_temp_bytes": int(m.temp_size_in_bytes),
        "compile_s": compile_s,
    }
    if args.memory:
        return out
    state = jax.jit(make_state)()
    base = jax.jit(make_base)() if lora_on else {}
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
    batch = {
        "inputs": jnp.asarray(toks[:, :-1]),
        "targets": jnp.asarray(toks[:, 1:]),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        "loss_mask": jnp.ones((b, t), jnp.float32),
    }
    for _ in range(2):
        state, metrics = compiled(state, batch, base)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch, base)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    measured = nbytes(state["opt_state"])
    assert measured == out["optimizer_bytes"], (measured, out["optimizer_bytes"])
    return dict(
        out,
        tokens_per_s=args.steps * b * t / seconds,
        peak_rss_bytes=_peak_rss_bytes(),
        loss=float(metrics["loss"]),
    )


def run_peft(args) -> dict:
    import peft
    import torch
    import transformers

    cfg = model_config(args)
    hf = transformers.LlamaConfig(**{**cfg.to_hf(), "max_position_embeddings": max(args.seq, 256)})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.base_dtype == "bfloat16" else torch.float32
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(hf).to(dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
    )
    for _, p in model.named_parameters():  # adapters in float32, as ours
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    toks = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=toks, labels=toks).loss
        loss.backward()
        opt.step()
        return loss

    def opt_bytes() -> int:
        return int(
            sum(
                v.numel() * v.element_size()
                for st in opt.state.values()
                for v in st.values()
                if torch.is_tensor(v)
            )
        )

    out = {"trainable": int(sum(p.numel() for p in params))}
    out["base_bytes"] = int(
        sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    )
    if args.memory:  # AdamW's state appears at its first step: take one on zero gradients
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        return dict(out, optimizer_bytes=opt_bytes())
    for _ in range(2):
        one()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    seconds = time.perf_counter() - start
    return dict(
        out,
        optimizer_bytes=opt_bytes(),
        tokens_per_s=args.steps * args.batch * args.seq / seconds,
        peak_rss_bytes=_peak_rss_bytes(),
        loss=float(loss),
    )


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def report(args, results: dict) -> None:
    cfg = model_config(args)
    print(
        f"\nsize {args.size} ({cfg.param_count() / 1e6:.1f}M params, {cfg.n_layers} layers), "
        f"batch {args.batch} x seq {args.seq}, rank {args.rank}, base {args.base_dtype}"
        + ("" if args.memory else f", {args.steps} timed steps")
        + "; one process and one CPU device per job"
    )
    cols = ["trainable", "opt state MiB", "compiled MiB", "of it temp MiB"]
    if not args.memory:
        cols += ["tokens/s", "peak RSS MiB"]
    print(f"{'job':<10}" + "".join(f"{c:>15}" for c in cols))
    for job, r in results.items():
        row = [f"{r['trainable']:,}", _mib(r["optimizer_bytes"]), _mib(r.get("compiled_bytes"))]
        row.append(_mib(r.get("compiled_temp_bytes")))
        if not args.memory:
            row += [f"{r['tokens_per_s']:.0f}", _mib(r["peak_rss_bytes"])]
        print(f"{job:<10}" + "".join(f"{c:>15}" for c in row))
    lo, fu, pe = (results.get(k) for k in JOBS)
    if lo and fu:
        ratio = lo["optimizer_bytes"] / fu["optimizer_bytes"]
        print(f"optimizer state, jax_lora / jax_full: {ratio:.2%} (goal <= 2%)")
        ratio = lo["compiled_bytes"] / fu["compiled_bytes"]
        print(f"compiled step memory, jax_lora / jax_full: {ratio:.2f}x")
        if not args.memory:
            print(f"tokens/s, jax_lora / jax_full: {lo['tokens_per_s'] / fu['tokens_per_s']:.2f}x")
            print(
                f"peak RSS, jax_lora / jax_full: {lo['peak_rss_bytes'] / fu['peak_rss_bytes']:.2f}x"
            )
    if lo and pe:
        ratio = lo["optimizer_bytes"] / pe["optimizer_bytes"]
        print(f"optimizer state, jax_lora / peft_lora: {ratio:.2f}x")
        if not args.memory:
            ratio = lo["tokens_per_s"] / pe["tokens_per_s"]
            print(f"tokens/s, jax_lora / peft_lora: {ratio:.2f}x (goal >= 1.5x)")
            ratio = lo["peak_rss_bytes"] / pe["peak_rss_bytes"]
            print(f"peak RSS, jax_lora / peft_lora: {ratio:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--layers", type=int, default=0, help="keep this many layers (0: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--base_dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="base weights and compute; auto: bfloat16 for 1b, else float32",
    )
    p.add_argument("--memory", action="store_true", help="bytes only: no timed steps")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma list of {', '.join(JOBS)}")
    p.add_argument("--_job", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.base_dtype == "auto":
        args.base_dtype = "bfloat16" if args.size == "1b" else "float32"
    jobs = args.jobs.split(",")
    bad = [j for j in jobs if j not in JOBS]
    if bad or args.layers < 0 or min(args.batch, args.seq, args.steps, args.rank) < 1:
        p.error(f"--jobs {bad} not in {JOBS}" if bad else "counts must be >= 1 (--layers >= 0)")
    if args._job:
        out = run_peft(args) if args._job == "peft_lora" else run_jax(args, args._job == "jax_lora")
        print("RESULT " + json.dumps(out))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, like torch
    results = {}
    for job in jobs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_job", job]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"{job}: failed\n{done.stderr[-2000:]}")
            continue
        results[job] = json.loads(line[-1][len("RESULT ") :])
        print(f"{job}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    report(args, results)


if __name__ == "__main__":
    main()
