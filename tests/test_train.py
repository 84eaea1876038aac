"""The trainer: meshes, multi-process, kill -9 / SIGTERM resume, NaN policies, experiments."""

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from poison import poisoned_batch

from llama_jax.formats import checkpoint
from llama_jax.model import sharding
from llama_jax.training import experiment, trainer
from llama_jax.training import step as training_step
from llama_jax.training.experiment import base_config, model_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "fair",
    "foul",
    "heart",
    "blood",
    "war",
    "peace",
    "speak",
    "hear",
    "see",
    "come",
    "go",
    "stay",
    "fly",
    "sing",
    "weep",
    "laugh",
    "gold",
    "silver",
    "moon",
    "sun",
    "star",
    "sea",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """60 generated documents of pseudo-English, and a SentencePiece tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = root / "docs"
    docs.mkdir()
    for i in range(60):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
            for _ in range(rng.randint(3, 12))
        ]
        (docs / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    from llama_jax.tokenizer.train import train_tokenizer

    all_text = root / "all.txt"
    all_text.write_text("".join(p.read_text() for p in sorted(docs.iterdir())))
    train_tokenizer(str(all_text), 400, str(root / "tok"), show_progress=False)
    return {"data": str(docs), "tokenizer": str(root / "tok")}


def tiny_config(corpus, run_dir, **overrides):
    c = base_config()
    c.model = model_config_dict("tiny", vocab_size=512, max_seq_len=128)
    c.data_path = corpus["data"]
    c.train_split, c.valid_split = "train[:85%]", "train[85%:]"
    c.tokenizer_path = corpus["tokenizer"]
    c.seq_len = 32
    c.batch_size = 8
    c.num_steps = 5
    c.learning_rate = 3e-3
    c.warmup_steps = 2
    c.log_every = 1
    c.checkpoint_every = 1000
    c.eval_batches = 2
    c.peak_flops = 1e11
    c.progress = False
    c.tensorboard = False
    c.run_dir = str(run_dir)
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def losses(run_dir):
    """step -> loss from metrics.jsonl; a step logged twice (before and after a resume)
    keeps its last value."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row and "valid_loss" not in row and "nonfinite_step" not in row:
                out[row["step"]] = row["loss"]
    return out


def final_state(run_dir, mesh=None):
    """The newest committed training state as host numpy."""
    steps = checkpoint.committed_steps(os.path.join(run_dir, "checkpoints"))
    path = os.path.join(run_dir, "checkpoints", str(steps[-1]), "state")
    return steps[-1], checkpoint.load_params(path)


def assert_trees_equal(a, b):
    """Bitwise equal leaves (optimizer states restore as dicts where they were namedtuples)."""
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ----------------------------------------------------------------------------- meshes
def test_meshes_give_the_same_losses(corpus, tmp_path):
    results = {}
    # data x fsdp, and all three axes at once (a pure data mesh is the first half of (2, 4, 1))
    for shape in [(1, 1, 1), (2, 4, 1), (2, 2, 2)]:
        run = tmp_path / "x".join(map(str, shape))
        n = int(np.prod(shape))
        out = trainer.train(tiny_config(corpus, run, mesh_shape=shape, num_devices=n))
        results[shape] = losses(run)
        assert out["step"] == 5 and np.isfinite(out["valid_loss"])
    ref = results[(1, 1, 1)]
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert ref[5] < ref[1]  # it learns
    for shape, got in results.items():
        np.testing.assert_allclose(
            [got[s] for s in ref], [ref[s] for s in ref], atol=1e-5, err_msg=str(shape)
        )


def test_gradient_accumulation_matches_full_batch(corpus, tmp_path):
    a = trainer.train(tiny_config(corpus, tmp_path / "a", num_steps=3))
    b = trainer.train(
        tiny_config(
            corpus,
            tmp_path / "b",
            num_steps=3,
            grad_accum_steps=4,
            mesh_shape=(1, 2, 1),
            num_devices=2,
        )
    )
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    np.testing.assert_allclose([lb[s] for s in la], [la[s] for s in la], atol=1e-5)
    assert abs(a["valid_loss"] - b["valid_loss"]) < 1e-4


def test_restore_on_a_different_mesh(corpus, tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(corpus, run, num_steps=3, mesh_shape=(2, 4, 1), num_devices=8))
    step, saved = final_state(str(run))
    # Restore onto 4 devices with tensor parallelism, through the trainer's own path.
    c = tiny_config(corpus, run, num_steps=3, mesh_shape=(1, 2, 2), num_devices=4)
    mesh = trainer.make_run_mesh(c)
    mc = experiment.model_config(c)
    tx, _ = trainer.make_tx(c, 3)
    abstract = jax.eval_shape(lambda: trainer.init_state(mc, tx, 0))
    shardings = sharding.logical_to_sharding(abstract, mesh)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.unbox(abstract),
        shardings,
    )
    ckpt = checkpoint.TrainCheckpointer(str(run / "checkpoints"))
    state, data_state = ckpt.restore_latest(target)
    assert data_state["step"] == 3
    wq = state["params"]["layers"]["attention"]["wq"]
    assert wq.sharding.mesh.devices.size == 4
    assert_trees_equal(jax.device_get(state), saved)
    # And training continues on the new mesh.
    out = trainer.train(tiny_config(corpus, run, num_steps=5, mesh_shape=(1, 2, 2), num_devices=4))
    assert out["step"] == 5


def test_run_directory_loads_as_a_model(corpus, tmp_path):
    from llama_jax import Llama3

    run = tmp_path / "run"
    trainer.train(tiny_config(corpus, run, num_steps=2))
    model = Llama3.from_pretrained(str(run), dtype="float32")
    _, saved = final_state(str(run))
    assert_trees_equal(model.host_params(), saved["params"])
    ids = model.tokenizer.encode("the king", bos=True)
    assert model.logits([ids]).shape == (1, len(ids), 512)


# ----------------------------------------------------------------------------- NaN
def test_nan_abort_keeps_the_last_checkpoint_finite(corpus, tmp_path):
    run = tmp_path / "run"
    c = tiny_config(corpus, run, num_steps=8, checkpoint_every=2, nan_policy="abort")
    with (
        poisoned_batch(at=4),
        pytest.raises(trainer.NonFiniteLossError, match="step from 4 to 5 gave a non-finite"),
    ):
        trainer.train(c)
    step, state = final_state(str(run))
    assert step == 4
    for leaf in jax.tree.leaves(state["params"]):
        assert np.isfinite(leaf).all()


def test_nan_skip_leaves_the_state_unchanged(corpus, tmp_path):
    before = tmp_path / "before"
    trainer.train(tiny_config(corpus, before, num_steps=8, debug_stop_after=3, nan_policy="skip"))
    after = tmp_path / "after"
    with poisoned_batch(at=3):
        trainer.train(
            tiny_config(corpus, after, num_steps=8, debug_stop_after=4, nan_policy="skip")
        )
    s3, a = final_state(str(before))
    s4, b = final_state(str(after))
    assert (s3, s4) == (3, 4)
    assert_trees_equal(a["params"], b["params"])
    assert_trees_equal(a["opt_state"], b["opt_state"])
    assert not np.isfinite(losses(after)[4])  # the skipped step is logged, as non-finite


# ----------------------------------------------------------------------------- processes
EXPERIMENT = """
from llama_jax.training.experiment import base_config, model_config_dict

def get_config(arg=None):
    c = base_config()
    c.model = model_config_dict("tiny", vocab_size=512, max_seq_len=128)
    c.data_path = {data!r}
    c.train_split, c.valid_split = "train[:85%]", "train[85%:]"
    c.tokenizer_path = {tok!r}
    c.seq_len = 32
    c.batch_size = 8
    c.num_steps = {steps}
    c.learning_rate = 3e-3
    c.warmup_steps = 2
    c.log_every = 1
    c.checkpoint_every = 1
    c.eval_batches = 2
    c.peak_flops = 1e11
    c.progress = False
    c.tensorboard = False
    c.mesh_shape = (1, -1, 1)
    return c
"""


def _experiment_file(corpus, tmp_path, steps):
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(data=corpus["data"], tok=corpus["tokenizer"], steps=steps))
    return str(path)


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def _train_cmd(exp, run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "llama_jax.cli",
        "train",
        "--config",
        exp,
        "--model_path",
        str(run_dir),
        *extra,
    ]


def test_two_processes_match_one(corpus, tmp_path):
    exp = _experiment_file(corpus, tmp_path, steps=4)
    multi = tmp_path / "multi"
    proc = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "launch", "multiprocess.sh"),
            "2",
            "2",
            exp,
            "--model_path",
            str(multi),
            "--config.checkpoint_every=2",
        ],
        env=_env(2) | {"LOG_DIR": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    single = tmp_path / "single"
    c = experiment.load_config(exp)
    c.run_dir, c.num_devices, c.checkpoint_every = str(single), 4, 2
    trainer.train(c)
    a, b = losses(multi), losses(single)
    assert sorted(a) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], atol=1e-5)
    # Cross-process (gloo) reductions sum in another order than in-process ones: close, not
    # bitwise.
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
        final_state(str(multi))[1]["params"],
        final_state(str(single))[1]["params"],
    )


def _wait_for_step(run_dir, step, proc, timeout=300):
    start = time.time()
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()[-3000:]}")
        if os.path.exists(path) and max(losses(run_dir) or [0]) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("trainer made no progress")


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted 12-step run in a subprocess (same devices as the interrupted ones)."""
    tmp = tmp_path_factory.mktemp("reference")
    exp = _experiment_file(corpus, tmp, steps=12)
    run = tmp / "run"
    subprocess.run(
        _train_cmd(exp, run, "--num_gpus", "2"),
        env=_env(2),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return exp, str(run)


def test_kill_9_then_resume_is_bitwise_identical(reference_run, tmp_path):
    exp, ref = reference_run
    run = tmp_path / "run"
    kill_at = random.Random(os.getpid()).randint(3, 9)
    proc = subprocess.Popen(
        _train_cmd(exp, run, "--num_gpus", "2"),
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(str(run), kill_at, proc)
    proc.send_signal(signal.SIGKILL)  # checkpoint_every=1: a save is in flight
    proc.wait()
    ckpts = run / "checkpoints"
    # Plant half-written step directories: they must be ignored, not restored.
    (ckpts / "99").mkdir()
    (ckpts / "99" / "state").mkdir()
    (ckpts / "7.orbax-checkpoint-tmp-1").mkdir(exist_ok=True)
    resumed = subprocess.run(
        _train_cmd(exp, run, "--num_gpus", "2"),
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert glob.glob(str(ckpts / "99.uncommitted-*"))  # moved aside, not deleted
    assert losses(str(run)) == losses(ref)
    assert_trees_equal(final_state(str(run))[1], final_state(ref)[1])


def test_sigterm_saves_and_exits_cleanly(reference_run, tmp_path):
    exp, ref = reference_run
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(exp, run, "--num_gpus", "2", "--config.checkpoint_every=1000"),
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(str(run), 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err
    # It saves exactly the step it stopped at, the last one it logged: none lost or half-saved.
    stopped = re.search(r"stopping at step (\d+) \(SIGTERM\)", err)
    assert stopped, err[-3000:]
    at = int(stopped.group(1))
    assert checkpoint.committed_steps(str(run / "checkpoints")) == [at]
    assert max(losses(str(run))) == at and at >= 3
    resumed = subprocess.run(
        _train_cmd(exp, run, "--num_gpus", "2", "--config.checkpoint_every=1000"),
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(str(run)) == losses(ref)
    assert_trees_equal(final_state(str(run))[1], final_state(ref)[1])


# ----------------------------------------------------------------------------- experiments
EXPERIMENT_MESHES = {  # the hardware each experiment documents
    "shakespeare_tiny.py": (1, 1, 1),
    "shakespeare_tiny.py:runlocal": (1, 1, 1),
    "llama3_2_1b.py": (1, 8, 1),
    "llama3_2_1b.py:runlocal": (1, 1, 1),
    "llama3_1_8b.py": (1, 64, 1),
    "llama3_1_8b.py:gpu": (1, 64, 1),
    "continued_pretraining.py": (1, 8, 1),
    "continued_pretraining.py:runlocal": (1, 1, 1),
    "sft_chat.py": (1, 1, 1),
    "sft_chat.py:full": (1, 8, 1),
    "sft_chat.py:8b_lora": (1, 8, 1),
    "sft_chat.py:runlocal": (1, 1, 1),
}


def test_every_experiment_is_listed():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))}
    assert files == {k.split(":")[0] for k in EXPERIMENT_MESHES}


@pytest.mark.parametrize("spec", sorted(EXPERIMENT_MESHES))
def test_experiment_is_consistent(spec):
    name, _, variant = spec.partition(":")
    c = experiment.load_config(
        os.path.join(ROOT, "experiments", name) + (":" + variant if variant else "")
    )
    assert c.get("__doc__") is None
    with open(os.path.join(ROOT, "experiments", name)) as f:
        module_doc = f.read()
    assert "llama3 train" in module_doc or "launch/" in module_doc  # documents its launch
    mc = experiment.model_config(c)
    mesh = jax.sharding.AbstractMesh(EXPERIMENT_MESHES[spec], sharding.MESH_AXES)
    sharding.check_model_fits_mesh(mc, mesh)
    sharding.check_batch_fits_mesh(c.batch_size // c.grad_accum_steps, mesh)
    assert c.seq_len <= mc.max_seq_len
    tx, _ = trainer.make_tx(c, c.num_steps)
    abstract = jax.eval_shape(lambda: trainer.init_state(mc, tx, 0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract["params"])))
    assert n == mc.param_count()
    specs = nn.get_partition_spec(abstract)
    assert specs["params"]["layers"]["mlp"]["w_up"] == jax.sharding.PartitionSpec(
        "layers", "embed", "mlp"
    )


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            {"batch_size": 6, "mesh_shape": (1, 4, 1), "num_devices": 4},
            ValueError,
            "batch size 6 is not divisible by the batch axes data\\*fsdp=4",
        ),
        (
            {"mesh_shape": (1, 1, 8), "num_devices": 8},
            ValueError,
            "n_heads=4 is not divisible by the mesh's tensor axis",
        ),
        ({"num_devices": 16}, ValueError, "num_devices=16 requested but only 8 devices"),
        (
            {"data_path": "/nonexistent/corpus/*.txt"},
            FileNotFoundError,
            "data_path='/nonexistent/corpus/\\*.txt' does not exist",
        ),
        ({"seq_len": 1024}, ValueError, "seq_len=1024 exceeds the model's max_seq_len"),
        ({"nan_policy": "ignore"}, ValueError, "nan_policy='ignore'; valid"),
    ],
)
def test_bad_configs_fail_before_compiling(corpus, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        trainer.train(tiny_config(corpus, tmp_path / "run", **overrides))


def test_run_dir_with_another_model_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(corpus, run, num_steps=1))
    with pytest.raises(ValueError, match="holds a different model.*'dim': \\(64, 128\\)"):
        trainer.train(tiny_config(corpus, run, **{"model.dim": 128}))


def test_unwritable_run_dir(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="is not writable"):
        trainer.train(tiny_config(corpus, blocker / "run"))


def test_overrides_are_type_checked_and_unknown_keys_listed():
    c = base_config()
    experiment.parse_overrides(
        c,
        [
            "--config.seq_len=64",
            "--batch_size",
            "4",
            "--config.model.dim=128",
            "--learning_rate=1e-3",
        ],
    )
    assert (c.seq_len, c.batch_size, c.model.dim, c.learning_rate) == (64, 4, 128, 1e-3)
    with pytest.raises(KeyError, match="unknown config key 'seqlen'.*seq_len"):
        experiment.parse_overrides(c, ["--config.seqlen=3"])
    with pytest.raises(ValueError, match="--config.seq_len='long'; valid: an integer"):
        experiment.parse_overrides(c, ["--config.seq_len=long"])


def test_train_cli_rejects_unknown_flags(tmp_path):
    from llama_jax.cli import main

    exp = os.path.join(ROOT, "experiments", "shakespeare_tiny.py")
    with pytest.raises(SystemExit):
        main(["train", "--config", exp, "--bogus_flag=1"])
    assert main(["train", "--config", exp + ":runlocal", "--print_config"]) == 0


def test_launch_scripts_are_valid_bash():
    for script in glob.glob(os.path.join(ROOT, "launch", "*")):
        subprocess.run(["bash", "-n", script], check=True)
    with open(os.path.join(ROOT, "launch", "multiprocess.sh")) as f:
        assert "coordinator_address" in f.read()


def test_init_from_starts_from_the_given_weights(corpus, tmp_path):
    a = tmp_path / "a"
    out_a = trainer.train(tiny_config(corpus, a, num_steps=3))
    # A learning rate of 1e-30 leaves float32 weights as they were: b starts (and ends) at a.
    b = tmp_path / "b"
    out_b = trainer.train(
        tiny_config(corpus, b, num_steps=1, init_from=str(a), learning_rate=1e-30, warmup_steps=0)
    )
    assert_trees_equal(final_state(str(a))[1]["params"], final_state(str(b))[1]["params"])
    assert out_a["valid_loss"] == out_b["valid_loss"]


def _dot_operand_types(c):
    """(lhs, rhs) tensor types ("8x32x64xbf16") of every dot_general in config c's train step."""
    import jax.numpy as jnp

    mc = experiment.model_config(c)
    tx, schedule = trainer.make_tx(c, c.num_steps)
    state = nn.unbox(jax.eval_shape(lambda: trainer.init_state(mc, tx, 0)))
    shape = (c.batch_size, c.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    }
    step = jax.jit(training_step.make_train_step(mc, tx, schedule, c))
    text = step.lower(state, batch).as_text()
    return re.findall(r"stablehlo.dot_general .*?: \(tensor<([^>]*)>, tensor<([^>]*)>\)", text)


def test_bfloat16_compute_with_float32_master_weights(corpus, tmp_path):
    run = tmp_path / "run"
    c = tiny_config(corpus, run, num_steps=4, **{"model.dtype": "bfloat16"})
    # The matmuls really run in bfloat16: in the lowered step (forward and backward) every dot
    # takes bf16 operands (the chunked loss casts the logits' cotangent back to bf16) except
    # the two that take the attention scores' float32 cotangent; a float32 config has none.
    dots = _dot_operand_types(c)
    not_bf16 = [d for d in dots if not (d[0].endswith("bf16") and d[1].endswith("bf16"))]
    # Exactly two are not: the backward of the attention scores, whose float32 cotangent is
    # [B, K, T, S, G] (batch 8, 2 kv heads, 32 x 32 positions, 2 query heads per kv head).
    assert len(not_bf16) == 2 and all(a == "8x2x32x32x2xf32" for a, _ in not_bf16), not_bf16
    f32_dots = _dot_operand_types(tiny_config(corpus, run, num_steps=4))
    assert len(f32_dots) == len(dots)
    assert all(a.endswith("xf32") and b.endswith("xf32") for a, b in f32_dots)
    out = trainer.train(c)
    _, state = final_state(str(run))
    assert state["params"]["embedding"].dtype == np.float32
    got = losses(run)
    assert np.isfinite(out["valid_loss"]) and got[4] < got[1]
