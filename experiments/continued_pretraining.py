"""Continued pretraining of a converted Llama 3.2 1B on your own corpus.

    llama3 convert --input /models/Llama-3.2-1B --output models/llama3.2-1b
    llama3 train --config experiments/continued_pretraining.py \
        --config.init_from=models/llama3.2-1b --data_path 'corpus/*.jsonl' \
        --model_path runs/cpt

The tokenizer comes from the converted model directory and the architecture (preset
llama3.2-1b) is checked against it before training; training starts from its weights with a
fresh optimizer, a short warmup and a lower peak learning rate (3e-5) so the model keeps what
it knew. Hardware: 8 GPUs (fsdp=8); 5k steps of 64 x 4096 tokens.
TPU: a v5e-8 with `--config.model.attention_impl=splash`. `llama3 plan --config
experiments/continued_pretraining.py --topology v5e-8 --config.model.attention_impl=splash`:
train state 1.73 GiB per chip of 16, MFU bound 87.1% (compute term); fits not yet compiled (8
rows of 4096 per chip, the per-chip tokens of llama3_2_1b.py's 32 x 2048, which does not fit a
v5e-8 without grad_accum_steps: expect to need it here too).
Local corpora have a single split: 2% of the documents are held out for validation.

Variants: `runlocal` continues a tiny model directory on the Shakespeare corpus on CPU
(give --config.init_from=DIR of a model with the tiny architecture).
"""

from llama_jax.training.experiment import base_config, model_config_dict


def get_config(arg: str | None = None):
    c = base_config()
    c.model = model_config_dict(
        "llama3.2-1b", dtype="bfloat16", attention_impl="cudnn", remat_policy="dots"
    )
    c.init_from = "models/llama3.2-1b"
    c.tokenizer_path = "models/llama3.2-1b"
    c.data_path = "corpus/*.jsonl"
    c.train_split = "train[:98%]"
    c.valid_split = "train[98%:]"
    c.seq_len = 4096
    c.batch_size = 64
    c.num_steps = 5000
    c.learning_rate = 3e-5
    c.warmup_steps = 200
    c.schedule = "cosine"
    c.mesh_shape = (1, 8, 1)
    c.eval_every = 500
    c.eval_batches = 20
    c.checkpoint_every = 500
    c.run_dir = "runs/continued_pretraining"
    if arg == "runlocal":
        c.model = model_config_dict("tiny", vocab_size=8000)
        c.data_path = "shakespeare"
        c.train_split, c.valid_split = "train", "validation"
        c.seq_len = 128
        c.batch_size = 8
        c.num_steps = 10
        c.warmup_steps = 2
        c.mesh_shape = (1, -1, 1)
        c.eval_batches = 2
        c.run_dir = "runs/continued_pretraining_runlocal"
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; valid: 'runlocal'")
    return c
