"""Llama 3.2 1B pretraining from scratch on a TFDS corpus.

    llama3 train --config experiments/llama3_2_1b.py --model_path gs://bucket/runs/1b \
        --data_path tfds:c4/en:3.1.0 --config.data_dir=gs://bucket/tfds

Hardware: 8 GPUs (one node, e.g. 8x H100: mesh data=1, fsdp=8) or a TPU v5e-8. bfloat16
compute, float32 master weights, sequence 2048, global batch 256 sequences (0.5M tokens per
step), 20k steps (~10B tokens), cuDNN flash attention on GPU (`--config.model.attention_impl=
splash` on TPU). Expected: about 25-30k tokens/s per H100 at 40% MFU; the Chinchilla-optimal
budget for 1.24B parameters is ~25B tokens, so raise num_steps for a fully trained model.

TPU plan (`llama3 plan`, libtpu 0.0.42.1; bench/RESULTS.md "llama3 plan"): targets a v5e-8 with
`--config.model.attention_impl=splash --config.grad_accum_steps=8`. As written (no
accumulation, 32 rows of 2048 per chip) it does NOT fit: 56.12 GiB of temporaries against 15.75
(exit 2, the compiler's figure). With grad_accum_steps=8 (and `--config.mesh_shape='(1,-1,1)'`)
it fits: 12.52 GiB per chip of 16 (params 0.58, AdamW 1.15, temporaries 10.79; eval step 6.56),
MFU bound 92.5% (compute term: the splash backward's extra work; roofline 2.96 s per step;
compiled in 517 s). On a v5p-64 (mesh (1,-1,1)) it fits: 15.90 GiB of 95 per chip, MFU bound 92.5%
(roofline 317 ms per step; compiled in 626 s); on a v6e-256: 3.53 GiB of 32, bound 92.5%.

GPU plan (`llama3 plan --topology h100-8 --config.model.attention_impl=xla`, jax's CUDA plugin:
cuDNN attention cannot be traced without a GPU; XLA's attention keeps its [T, T] scores, so
its memory is an upper bound for cuDNN's): as written it needs 564 GiB per GPU (32 rows, the
scores kept by remat dots), which says nothing of cuDNN; with `--config.grad_accum_steps=16` it
fits in 38.35 GiB of the 59.74 jax gives XLA on an H100 (grad_accum 8 with remat full: 9.32
GiB, MFU bound 83.0%; grad_accum 8 on an h200-8: 73.28 of 105.30).

Variants: `runlocal` shrinks the model and data to a few CPU steps (checks the wiring).
"""

from llama_jax.training.experiment import base_config, model_config_dict


def get_config(arg: str | None = None):
    c = base_config()
    c.model = model_config_dict(
        "llama3.2-1b",
        dtype="bfloat16",
        attention_impl="cudnn",
        remat_policy="dots",
        max_seq_len=8192,
    )
    c.data_path = "tfds:c4/en:3.1.0"
    c.tokenizer_path = "tokenizers/llama3"  # the Llama 3 tokenizer.model (128,256 ids)
    c.seq_len = 2048
    c.batch_size = 256
    c.num_steps = 20000
    c.learning_rate = 3e-4
    c.warmup_steps = 2000
    c.schedule = "cosine"
    c.mesh_shape = (1, 8, 1)
    c.eval_every = 1000
    c.eval_batches = 50
    c.checkpoint_every = 1000
    c.log_every = 50
    c.run_dir = "runs/llama3_2_1b"
    if arg == "runlocal":
        c.model = model_config_dict("tiny", vocab_size=8000)
        c.data_path = "shakespeare"
        c.tokenizer_path = ""
        c.seq_len = 128
        c.batch_size = 8
        c.num_steps = 10
        c.warmup_steps = 2
        c.mesh_shape = (1, -1, 1)
        c.eval_batches = 2
        c.run_dir = "runs/llama3_2_1b_runlocal"
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; valid: 'runlocal'")
    return c
