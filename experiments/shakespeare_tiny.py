"""Shakespeare on a CPU: the README demo.

Trains a SentencePiece tokenizer (8k BPE) on the complete works of Shakespeare (the built-in
`shakespeare` TFDS dataset, public domain: 39 works for training, Macbeth, The Comedy of
Errors and A Lover's Complaint held out), then a 10.4M-parameter Llama 3 (8 layers, d=256,
4 query / 2 kv heads, MLP 768, untied) on it.

    llama3 train --config experiments/shakespeare_tiny.py --model_path runs/shakespeare

Hardware: 2 CPU cores, float32: ~1,750 tokens/s, so 250 steps of 16 x 256 tokens (1.0M
tokens, ~0.8 epoch) take ~10 minutes (~700 tokens/s, ~23 minutes, on a host with half the
matmul speed: README). Expected (measured): validation loss 5.06 nats per token
(perplexity 158) on the three held-out works; samples have the shape of a play (speaker names,
short verse lines) with loosely English words. `scripts/demo.sh` took 11 min 48 s end to end.

Variants (`--config experiments/shakespeare_tiny.py:VARIANT`):
  runlocal  a 2-layer d=64 model for 20 steps on 8 x 64 tokens: a smoke test in ~1 minute.
"""

from llama_jax.training.experiment import base_config, demo_model_config, model_config_dict


def get_config(arg: str | None = None):
    c = base_config()
    c.model = demo_model_config()
    c.data_path = "shakespeare"
    c.tokenizer_vocab_size = 8000
    c.seq_len = 256
    c.batch_size = 16
    c.num_steps = 250
    c.learning_rate = 2e-3
    c.warmup_steps = 20
    c.schedule = "cosine"
    c.weight_decay = 0.1
    c.log_every = 10
    c.eval_every = 125
    c.checkpoint_every = 125
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
