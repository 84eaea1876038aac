"""Shakespeare on a CPU: the README demo.

Trains a SentencePiece tokenizer (8k BPE) on the complete works of Shakespeare (the built-in
`shakespeare` TFDS dataset, public domain), then a ~16M-parameter Llama 3 (6 layers, d=384,
6 query / 2 kv heads) on it.

    llama3 train --config experiments/shakespeare_tiny.py --model_path runs/shakespeare

Hardware: 2 CPU cores, float32, about 10 minutes. Expected: validation loss about 4.3 nats per
token (perplexity ~75) after 600 steps of 16 x 256 tokens (~2.5M tokens, ~1.7 epochs).

Variants (`--config experiments/shakespeare_tiny.py:VARIANT`):
  runlocal  a 2-layer d=64 model for 20 steps on 8 x 64 tokens: a smoke test in ~1 minute.
"""

from llama_jax.experiment import base_config, model_config_dict


def get_config(arg: str | None = None):
    c = base_config()
    c.model = model_config_dict(
        "small",
        vocab_size=8000,
        dim=256,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=768,
        max_seq_len=512,
    )
    c.data_path = "shakespeare"
    c.tokenizer_vocab_size = 8000
    c.seq_len = 256
    c.batch_size = 16
    c.num_steps = 200
    c.learning_rate = 2e-3
    c.warmup_steps = 20
    c.schedule = "cosine"
    c.weight_decay = 0.1
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    c.run_dir = "runs/shakespeare_tiny"
    if arg == "runlocal":
        c.model = model_config_dict(
            "tiny", vocab_size=8000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=192
        )
        c.seq_len = 64
        c.batch_size = 8
        c.num_steps = 20
        c.warmup_steps = 5
        c.eval_every = 0
        c.eval_batches = 4
        c.checkpoint_every = 10
        c.log_every = 5
        c.run_dir = "runs/shakespeare_tiny_runlocal"
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; valid: 'runlocal'")
    return c
