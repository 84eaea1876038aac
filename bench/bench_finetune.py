"""Fine-tuning side by side: llama_jax LoRA, llama_jax full fine-tune, peft + transformers LoRA.

Each job runs in its own process (so peak memory is its own): a random model of the chosen
shape, random tokens with every position trained, AdamW, `--steps` timed steps after 2 warm-up
steps. Printed per job: tokens/s, peak resident memory (ru_maxrss), bytes of optimizer state;
then the ratios, each naming its denominator.

    python bench/bench_finetune.py --size tiny --steps 5          # smoke test, seconds
    python bench/bench_finetune.py --size 50m --batch 4 --seq 256  # ~50M model
    python bench/bench_finetune.py --size 1b --base_dtype bfloat16 --batch 1 --seq 256

Goal of issue 10: LoRA tokens/s >= 1.5x peft's, optimizer state <= 2% of the full fine-tune's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {  # name -> ModelConfig fields (a Llama 3 shape; vocab kept for the 1B)
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=192),
    "50m": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, mlp_dim=1536),
    "1b": dict(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        mlp_dim=8192,
        tie_embeddings=True,
    ),  # fmt: skip
}
JOBS = ("jax_lora", "jax_full", "peft_lora")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jax(args, lora_on: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from llama_jax import lora, train
    from llama_jax.config import get_config
    from llama_jax.experiment import base_config
    from llama_jax.model import init_params

    cfg = get_config("tiny", **SIZES[args.size], max_seq_len=max(args.seq, 256))
    c = base_config()
    c.num_steps, c.warmup_steps, c.weight_decay = args.steps + 2, 1, 0.0
    c.lora.rank = args.rank if lora_on else 0
    c.lora.alpha = 2.0 * args.rank
    c = ml_collections.ConfigDict(c)
    tx, schedule = train.make_optimizer(c, c.num_steps)
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank) if lora_on else None
    import flax.linen as nn

    state = jax.jit(lambda: nn.unbox(train.init_state(cfg, tx, 0, lcfg)))()
    base = {}
    if lora_on:
        dt = jnp.dtype(args.base_dtype)
        base = jax.jit(
            lambda: jax.tree.map(
                lambda a: a.astype(dt), nn.unbox(init_params(cfg, jax.random.key(0)))
            )
        )()
    step = jax.jit(train.make_train_step(cfg, tx, schedule, c, lcfg), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    toks = rng.integers(0, cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
    batch = {
        "inputs": jnp.asarray(toks[:, :-1]),
        "targets": jnp.asarray(toks[:, 1:]),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        "loss_mask": jnp.ones((b, t), jnp.float32),
    }
    for _ in range(2):
        state, m = step(state, batch, base)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch, base)
    jax.block_until_ready(state)
    dt_s = time.perf_counter() - start
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))
    return {
        "tokens_per_s": args.steps * b * t / dt_s,
        "peak_rss_bytes": _peak_rss_bytes(),
        "optimizer_bytes": int(opt_bytes),
        "trainable": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
        "loss": float(m["loss"]),
    }


def run_peft(args) -> dict:
    import peft
    import torch
    import transformers

    s = SIZES[args.size]
    hf = transformers.LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["dim"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"],
        intermediate_size=s["mlp_dim"],
        tie_word_embeddings=s.get("tie_embeddings", False),
        max_position_embeddings=max(args.seq, 256),
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.base_dtype == "bfloat16" else torch.float32
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
    toks = torch.randint(0, s["vocab_size"], (args.batch, args.seq))

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=toks, labels=toks).loss
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):
        one()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    dt_s = time.perf_counter() - start
    opt_bytes = sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v)
    )
    return {
        "tokens_per_s": args.steps * args.batch * args.seq / dt_s,
        "peak_rss_bytes": _peak_rss_bytes(),
        "optimizer_bytes": int(opt_bytes),
        "trainable": int(sum(p.numel() for p in params)),
        "loss": float(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--_job", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._job:
        out = run_peft(args) if args._job == "peft_lora" else run_jax(args, args._job == "jax_lora")
        print("RESULT " + json.dumps(out))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, like torch
    results = {}
    for job in args.jobs.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_job", job]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"{job}: failed\n{done.stderr[-2000:]}")
            continue
        results[job] = json.loads(line[-1][len("RESULT ") :])
    print(
        f"\nsize {args.size}, batch {args.batch} x seq {args.seq}, rank {args.rank}, base "
        f"{args.base_dtype}, {args.steps} timed steps (one process per job)"
    )
    print(
        f"{'job':<10} {'tokens/s':>10} {'peak RSS MiB':>13} {'opt state B':>12} {'trainable':>11}"
    )
    for job, r in results.items():
        print(
            f"{job:<10} {r['tokens_per_s']:>10.0f} {r['peak_rss_bytes'] / 2**20:>13.0f} "
            f"{r['optimizer_bytes']:>12} {r['trainable']:>11}"
        )
    lo, fu, pe = (results.get(k) for k in JOBS)
    if lo and fu:
        print(f"jax_lora / jax_full tokens/s: {lo['tokens_per_s'] / fu['tokens_per_s']:.2f}x")
        print(
            f"jax_lora / jax_full optimizer state: "
            f"{lo['optimizer_bytes'] / fu['optimizer_bytes']:.2%} (goal <= 2%)"
        )
        print(f"jax_lora / jax_full peak RSS: {lo['peak_rss_bytes'] / fu['peak_rss_bytes']:.2f}x")
    if lo and pe:
        print(
            f"jax_lora / peft_lora tokens/s: {lo['tokens_per_s'] / pe['tokens_per_s']:.2f}x "
            "(goal >= 1.5x)"
        )
        print(f"jax_lora / peft_lora peak RSS: {lo['peak_rss_bytes'] / pe['peak_rss_bytes']:.2f}x")


if __name__ == "__main__":
    main()
