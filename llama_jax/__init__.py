"""llama_jax: Llama 3 family models in JAX/Flax."""

__version__ = "0.1.0"

from llama_jax.api import Llama3
from llama_jax.model.config import ModelConfig, get_config

__all__ = ["Llama3", "ModelConfig", "get_config"]
