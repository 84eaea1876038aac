"""llama_jax: Llama 3 family models in JAX/Flax."""

__version__ = "0.1.0"
