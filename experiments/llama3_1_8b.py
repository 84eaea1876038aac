"""Llama 3.1 8B pretraining on a TPU v5p pod slice or 64 H100s.

    launch/tpu_pod.sh my-v5p-128 us-east5-a experiments/llama3_1_8b.py \
        --model_path gs://bucket/runs/8b --data_path tfds:c4/en:3.1.0
    sbatch --nodes=8 launch/slurm.sbatch experiments/llama3_1_8b.py:gpu --model_path /shared/8b

Hardware: TPU v5p-128 (64 chips; mesh fsdp=64) or 8 nodes x 8 H100 (fsdp=64, tensor=1; use
`:gpu` for cuDNN attention). bfloat16 compute, float32 master weights and Adam moments
(~16 bytes/param = 128 GB sharded over 64 chips), full remat per layer, sequence 8192, global
batch 512 sequences (4M tokens per step), 1T tokens = 250k steps. Expected: MaxText reports
45% MFU for this model on TPU v6e; plan on 35-45% (~3,500-4,500 tokens/s per H100).

TPU plan (`llama3 plan --config experiments/llama3_1_8b.py --topology v5p-64
--config.mesh_shape="(1,-1,1)"`, libtpu 0.0.42.1; bench/RESULTS.md "llama3 plan"): on a v5p-64
(32 chips, 16 rows of 8192 per chip) it does NOT fit: 127.31 GiB of temporaries against 95.74
(exit 2). The target is the v5p-128 (64 chips, 8 rows per chip; not compiled yet). MFU bound
73.4% on any slice (compute term: remat full does 8 N + 16 L T N H for 6 N + 12 L T N H of model
FLOPs); train state 2.81 GiB per chip on the v5p-64. On a v6e-256 (2 rows per chip) it fits:
11.58 GiB per chip of 32 (params 0.12, AdamW 0.24, temporaries 11.23; eval step 1.44), roofline
1.41 s per step (compiled in 686 s). A v5e-8 holds the train state (11.22 GiB of 16) but not the
step: 237.37 GiB per chip needed (exit 2; 64 rows of 8192 per chip), nor with 64 microbatches of
one row (23.76 GiB). GPU plan (`:gpu --topology h100-64 --config.model.attention_impl=xla
--config.grad_accum_steps=8`, eight 8-GPU hosts, XLA's attention standing in for cuDNN's as an
upper bound): the train step fits in 26.56 GiB of the 59.74 jax gives XLA on an H100, MFU bound
80.0%; the eval step (8 rows of 8192 per GPU, not accumulated) would need 97.15 GiB with XLA's
attention, nothing like that with cuDNN's flash attention.
"""

from llama_jax.training.experiment import base_config, model_config_dict


def get_config(arg: str | None = None):
    c = base_config()
    c.model = model_config_dict(
        "llama3.1-8b", dtype="bfloat16", attention_impl="splash", remat_policy="full"
    )
    c.data_path = "tfds:c4/en:3.1.0"
    c.tokenizer_path = "tokenizers/llama3"
    c.seq_len = 8192
    c.batch_size = 512
    c.num_steps = 250_000
    c.learning_rate = 3e-4
    c.min_lr_ratio = 0.1
    c.warmup_steps = 2000
    c.schedule = "cosine"
    c.mesh_shape = (1, 64, 1)
    c.eval_every = 5000
    c.eval_batches = 100
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.log_every = 100
    c.run_dir = "runs/llama3_1_8b"
    if arg == "gpu":
        c.model.attention_impl = "cudnn"
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; valid: 'gpu'")
    return c
