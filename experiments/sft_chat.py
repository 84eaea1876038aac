"""Supervised chat fine-tuning (SFT) of Llama 3 Instruct models: LoRA and full variants.

    llama3 finetune --config experiments/sft_chat.py[:VARIANT] --init_from BASE \
        --model_path runs/sft [--data_path train.jsonl --valid_data_path valid.jsonl]

(`launch/*.sh` run it on several processes / hosts like `llama3 train`.)

BASE is any model directory `Llama3.from_pretrained` reads (Hugging Face, Meta, llama_jax, a
run). The default data is the built-in `chatterbot/en` (~1,900 short English dialogs, BSD;
every 20th held out for validation), rendered once in the Llama 3 chat format with the loss on
the assistant turns (`train_on = assistant`).

Variants:
  lora (default)  Llama 3.2 1B Instruct, LoRA r=16 alpha=32 on all seven projections, base in
                  bfloat16, seq 1024, batch 16, lr 2e-4, 2 epochs. Hardware: one 16 GB GPU or a
                  v5e-8 slice (`--config.mesh_shape="(1,-1,1)"`). Expected: validation loss
                  falls from the base's ~2.5 to ~1.6 nats per assistant token (not measured
                  here: this machine has no accelerator).
  full            the same, every weight trained (lora.rank = 0), lr 1e-5; 8 GPUs with fsdp.
  8b_lora         Llama 3.1 8B Instruct, LoRA r=16 on a (1, 8, 1) fsdp mesh, base in bfloat16,
                  remat; 8 x 80 GB GPUs or a v5p-16. Not measured here.
  TPU plan: `llama3 plan --config experiments/sft_chat.py --topology v5e-8
                  --config.model.attention_impl=splash --config.mesh_shape="(1,-1,1)"`
                  (the lora variant on a v5e-8): train state 0.38 GiB per chip of 16 (bf16
                  base + adapters and their AdamW moments), MFU bound 87.1% (compute term;
                  model FLOPs 4 N per token: the frozen base takes no weight gradients); fits
                  not yet compiled.
  runlocal        a CPU smoke test in minutes: LoRA r=8 on any small base (e.g. the
                  Shakespeare demo model, or `llama3 convert` of a tiny HF model), seq 128,
                  batch 8, 30 steps.
"""

from llama_jax.training.experiment import model_config_dict
from llama_jax.training.finetune import default_config

VARIANTS = ("lora", "full", "8b_lora", "runlocal")


def get_config(arg: str | None = None):
    arg = arg or "lora"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; valid: {', '.join(VARIANTS)}")
    c = default_config()
    # The architecture is read from --init_from at start; this documents the intended base
    # (and sizes the shape checks). Only dtype, remat, scan and attention_impl are ours.
    c.model = model_config_dict("llama3.2-1b", dtype="bfloat16")
    c.data_path = "chatterbot/en"
    c.seq_len = 1024
    c.batch_size = 16
    c.num_steps = 0
    c.num_epochs = 2
    c.learning_rate = 2e-4
    c.warmup_steps = 20
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.base_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.eval_every = 100
    c.checkpoint_every = 200
    c.run_dir = f"runs/sft_chat_{arg}"
    if arg == "full":
        c.lora.rank = 0
        c.base_dtype = ""
        c.learning_rate = 1e-5
        c.model.param_dtype = "float32"
        c.mesh_shape = (1, -1, 1)
    elif arg == "8b_lora":
        c.model = model_config_dict("llama3.1-8b", dtype="bfloat16", remat_policy="full")
        c.mesh_shape = (1, 8, 1)
        c.seq_len = 2048
        c.batch_size = 32
    elif arg == "runlocal":
        c.model = model_config_dict("tiny", max_seq_len=256)
        c.seq_len = 128
        c.batch_size = 8
        c.num_steps = 30
        c.num_epochs = 0
        c.warmup_steps = 5
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.base_dtype = ""
        c.learning_rate = 1e-3
        c.eval_every = 0
        c.eval_batches = 4
        c.checkpoint_every = 15
        c.log_every = 5
    return c
