"""Model shapes the benches share (run them as `python bench/NAME.py`, which puts bench/ on the
import path).

SMALL_50M is the ~57M model of PERF_NOTES.md: vocab 32000, d 512, 8 layers, 8 query / 2 kv
heads (head dim 64), MLP 1536, rope theta 5e5; 40.5M matmul parameters.
"""

SMALL_50M = dict(
    vocab_size=32000,
    dim=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=2,
    mlp_dim=1536,
    rope_theta=500000.0,
)
