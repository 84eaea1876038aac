"""llama_jax: train, fine-tune, evaluate and sample Llama 3 models in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="llama_jax",
    version="0.1.0",
    description="Llama 3 / 3.1 / 3.2 in JAX and Flax: pretraining, fine-tuning, sampling.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_jax", "llama_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.0",
        "numpy>=2.0",
        "safetensors>=0.4",
        "tiktoken>=0.7",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8",
        "pyarrow>=15",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "jinja2>=3.1",  # models' own chat templates (tokenizer/chat_template.py)
    ],
    extras_require={
        # torch and transformers are references for the tests (and read Meta .pth files);
        # torch==2.13.0 pins the CPU wheel.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on every core (pyproject addopts)
            "ruff>=0.6",
            "import-linter>=2.1",  # lint-imports: the layer contracts in pyproject.toml
            "gguf>=0.17",  # GGUF tensors; transformers' own GGUF loader (a reference) needs it
            "accelerate>=1.0",  # ... and this
            "torch==2.13.0",
            "transformers>=4.45",
            "peft>=0.13",
            "lm-eval[api]>=0.4.13",  # [api]: local-completions against llama3 serve
            "sacrebleu>=2.4",
            "openai>=1.40",
            "starlette>=0.37",
            "uvicorn>=0.29",
            "httpx>=0.27",
        ],
        "meta": ["torch==2.13.0"],
        # `llama3 eval` through lm-evaluation-harness; BLEU / chrF of the built-in tasks.
        "eval": ["lm-eval>=0.4.13", "sacrebleu>=2.4"],
        # GGUF files in and out (llama.cpp's quantised tensor types).
        "gguf": ["gguf>=0.17"],
        # `llama3 plan`: compile for a TPU topology from any host. jax's own extra pins the
        # libtpu built for that jax (jax 0.10.2 -> libtpu 0.0.42.*); on a TPU VM it is the runtime.
        "tpu": ["jax[tpu]>=0.10"],
        # `llama3 plan --topology h100-8`: compile for GPUs from any host. jax's own extra pins
        # its CUDA plugin (jax-cuda12-plugin + jax-cuda12-pjrt, ~500 MB) without NVIDIA's
        # libraries; no GPU needed. Kept asleep in CPU runs (llama_jax/cuda_plugin.py).
        "gpu-plan": ["jax[cuda12-local]>=0.10"],
        # `llama3 serve`: the OpenAI-compatible HTTP server.
        "serve": ["starlette>=0.37", "uvicorn>=0.29"],
    },
    entry_points={"console_scripts": ["llama3=llama_jax.cli:main"]},
)
