"""llama_jax: Llama 3 family models in JAX/Flax."""

__version__ = "0.1.0"

# Before anything imports jax: an installed CUDA plugin or libtpu stays out of CPU-only runs.
from llama_jax import cuda_plugin, tpu_plugin

cuda_plugin.keep_asleep()
tpu_plugin.keep_asleep(gpu_host=cuda_plugin.has_driver())

from llama_jax.api import Llama3  # noqa: E402
from llama_jax.inference.sampling_params import SamplingParams  # noqa: E402
from llama_jax.model.config import ModelConfig, get_config  # noqa: E402

__all__ = ["Llama3", "ModelConfig", "SamplingParams", "get_config"]
