"""One process of test_eval.py's multi-process scoring test: prints the scores as JSON.

usage: python eval_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT [MODEL_DIR]

With MODEL_DIR (a Hugging Face directory) it also prints the lm-eval backend's greedy
`generate_until` outputs on it.
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

if __name__ == "__main__":
    pid, nproc, port = (int(a) for a in sys.argv[1:4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
import numpy as np  # noqa: E402

from llama_jax.inference.scoring import Scorer  # noqa: E402
from llama_jax.model import sharding  # noqa: E402
from llama_jax.model.config import get_config  # noqa: E402
from llama_jax.model.transformer import init_params  # noqa: E402


def score(mesh):
    """The scores of the test's requests on `mesh` (the test calls this in-process too)."""
    cfg = get_config("tiny", vocab_size=256, max_seq_len=64, param_dtype="float32", dtype="float32")
    shardings = sharding.logical_to_sharding(
        jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0)), mesh
    )
    host = jax.tree.map(np.array, nn.unbox(init_params(cfg, jax.random.key(0))))
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host, shardings
    )
    rng = np.random.RandomState(0)
    requests = [
        ([1] + rng.randint(0, 256, rng.randint(1, 30)).tolist(), rng.randint(0, 256, 3).tolist())
        for _ in range(13)
    ]
    out = Scorer(cfg, params, mesh, max_batch_size=8).loglikelihood(requests)
    return [[r.logprob, r.greedy] for r in out]


GENERATE_PROMPTS = ["Once upon a time", "The answer is", "Hello", "Q: two plus two?\nA:", "x"]


def generate(model_dir, mesh):
    """The `llama_jax` lm-eval backend's greedy generate_until outputs on `mesh`: 5 prompts in
    batches of 4 (so one batch is padded), a stop string and a length limit."""
    from lm_eval.api.instance import Instance

    from llama_jax.api import Llama3
    from llama_jax.eval.harness import LlamaJaxLM

    model = Llama3.from_pretrained(model_dir, dtype="float32", mesh=mesh)
    lm = LlamaJaxLM(model=model, batch_size=4)
    kwargs = {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}
    reqs = [Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(GENERATE_PROMPTS)]
    return lm.generate_until(reqs, disable_tqdm=True)


if __name__ == "__main__":
    mesh = sharding.make_mesh((1, -1, 1))
    print("RESULT " + json.dumps(score(mesh)), flush=True)
    if len(sys.argv) > 4:
        print("GENERATE " + json.dumps(generate(sys.argv[4], mesh)), flush=True)
