"""`llama3 plan` (plan.py): the trainer's real steps compiled for compile-only TPU devices.

Needs libtpu (`pip install llama_jax[tpu]`) for the compiling tests; they skip without it.
Topology parsing and the missing-libtpu message are checked everywhere.
"""

import importlib.util
import json

import jax
import pytest

from llama_jax import cli
from llama_jax.model.config import get_config
from llama_jax.training import experiment, plan

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install llama_jax[tpu])"
)
TOPOLOGY = "v5e:2x2"  # 4 compile-only v5e chips


def DEFAULT_PRECISION():
    """conftest.py sets jax_default_matmul_precision="highest" for CPU references; Mosaic
    refuses splash's bf16 dots under it, and a TPU run keeps the default."""
    return jax.default_matmul_precision("default")


def tiny(**overrides):
    """A tiny experiment: pure FSDP over every chip, splash-compatible length (128)."""
    c = experiment.base_config()
    c.model = experiment.model_config_dict("tiny", max_seq_len=256)
    c.seq_len, c.batch_size, c.num_steps, c.warmup_steps = 128, 8, 10, 1
    c.mesh_shape = (1, -1, 1)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# ----------------------------------------------------------------------------- no libtpu needed
@pytest.mark.parametrize(
    "name, libtpu_name, chips",
    [
        ("v4-8", "v4:2x2x1", 4),  # v4/v5p slice names count TensorCores, two per chip
        ("v5e-16", "v5e:4x4", 16),
        ("v5e-8", "v5e:2x4", 8),
        ("v5p-64", "v5p:2x4x4", 32),
        ("v6e-256", "v6e:16x16", 256),
        ("v5e:4x4", "v5e:4x4", 16),
        ("v5p:2x2", "v5p:2x2x1", 4),
    ],
)
def test_topology_names(name, libtpu_name, chips):
    chip, topo, n = plan.parse_topology(name)
    assert (topo, n) == (libtpu_name, chips)
    assert chip.hbm_bytes > 0 and chip.peak_flops > 0


@pytest.mark.parametrize("name", ["v5e-3", "h100-8", "v5e:4y4", "v4-7", "tpu"])
def test_bad_topology_names(name):
    with pytest.raises(ValueError, match="topology|slice"):
        plan.parse_topology(name)


def test_without_libtpu_one_line(monkeypatch, capsys):
    """No libtpu: exit 1 and one line naming the extra to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        plan.importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
    )
    plan.topology_devices.cache_clear()
    rc = cli.main(
        ["plan", "--config", "experiments/llama3_2_1b.py:runlocal", "--topology", "v5e-4"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["error: " + plan.TPU_HINT]
    plan.topology_devices.cache_clear()


# ----------------------------------------------------------------------------- compiling
@pytest.fixture(scope="module")
def reports():
    """plan() of the tiny experiment in both kernels and both compute dtypes (one compile each)."""
    if not HAS_LIBTPU:
        pytest.skip("libtpu is not installed (pip install llama_jax[tpu])")
    out = {}
    for impl in ("xla", "splash"):
        for dtype in ("float32", "bfloat16"):
            c = tiny(**{"model.attention_impl": impl, "model.dtype": dtype})
            with DEFAULT_PRECISION():
                out[impl, dtype] = plan.plan(c, TOPOLOGY)
    return out


def _hand_param_bytes(chips: int) -> int:
    """Per-chip float32 param bytes of the tiny model under FSDP: every matrix has an `embed`
    axis split over the chips; the RMSNorm scales are replicated."""
    m = get_config("tiny")
    d, v, f, lyr = m.dim, m.vocab_size, m.mlp_dim, m.n_layers
    qo = 2 * d * m.n_heads * m.head_dim
    kv = 2 * d * m.n_kv_heads * m.head_dim
    matrices = 2 * v * d + lyr * (qo + kv + 3 * d * f)  # embedding + untied head, layers
    norms = 2 * lyr * d + d
    return 4 * (matrices // chips + norms)


@needs_libtpu
@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_compiles_both_steps(reports, impl, dtype):
    r = reports[impl, dtype]
    assert r["topology"] == TOPOLOGY and r["chips"] == 4
    assert r["hbm_bytes_per_chip"] == 16 * 1024**3
    # FSDP over 4 chips: a quarter of every matrix, plus replicated norms (params stay f32).
    assert r["per_chip_bytes"]["params"] == _hand_param_bytes(4)
    # AdamW keeps two moments per param, sharded like the params.
    assert r["per_chip_bytes"]["optimizer"] >= 2 * r["per_chip_bytes"]["params"]
    assert r["fits"] and 0 < r["per_chip_bytes"]["total"] < r["hbm_bytes_per_chip"]
    assert r["eval"]["total"] > r["eval"]["params"] > 0
    assert r["flops_per_step"] > 0 and r["roofline_step_seconds"] > 0
    assert 0 < r["mfu_bound"] <= 1.0
    # FSDP gathers weights and reduce-scatters (or all-reduces) gradients.
    assert r["collectives"].get("all-gather", 0) > 0


@needs_libtpu
def test_splash_costs_less_memory_than_xla(reports):
    """The compiler sees the splash kernel, not a [B, N, T, T] score tensor: the f32 step needs
    no more temporaries than XLA's."""
    xla, splash = reports["xla", "float32"], reports["splash", "float32"]
    assert splash["per_chip_bytes"]["temporaries"] <= xla["per_chip_bytes"]["temporaries"]


@needs_libtpu
def test_memory_falls_with_remat_and_with_batch():
    """The compiler's temporaries fall when remat goes none -> full, and when the batch halves."""
    base = dict(seq_len=512, batch_size=32, **{"model.max_seq_len": 512})
    temps = {}
    for name, extra in [
        ("none", {"model.remat_policy": "none"}),
        ("full", {"model.remat_policy": "full"}),
        ("half", {"model.remat_policy": "none", "batch_size": 16}),
    ]:
        r = plan.plan(tiny(**base, **extra), TOPOLOGY, with_eval=False)
        temps[name] = r["per_chip_bytes"]["temporaries"]
    assert temps["full"] < temps["none"], temps
    assert temps["half"] < temps["none"], temps


@needs_libtpu
def test_too_big_exits_2_with_one_line(tmp_path, capsys):
    """A model too big for 4 v5e chips: exit 2 and one line saying by how much and what helps."""
    out = tmp_path / "plan.json"
    argv = [
        "plan",
        "--config",
        "experiments/llama3_2_1b.py:runlocal",
        "--topology",
        TOPOLOGY,
        "--config.model.vocab_size=2097152",
        "--config.model.dim=2048",
        "--config.model.n_heads=16",
        "--config.model.n_kv_heads=4",
        "--json",
        str(out),
    ]
    rc = cli.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 2
    assert lines[-1].startswith("does not fit: ") and "GiB" in lines[-1], lines
    assert "remat_policy=full" in lines[-1] and "batch" in lines[-1] and "fsdp" in lines[-1]
    assert json.loads(out.read_text())["fits"] is False


@needs_libtpu
def test_json_keys(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", "experiments/llama3_2_1b.py:runlocal", "--topology", TOPOLOGY]
    assert cli.main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) >= {
        "topology",
        "chips",
        "hbm_bytes_per_chip",
        "per_chip_bytes",
        "fits",
        "flops_per_step",
        "roofline_step_seconds",
        "mfu_bound",
        "collectives",
        "eval",
    }
    assert set(r["per_chip_bytes"]) == {"params", "optimizer", "temporaries", "total"}
    assert "fits" in capsys.readouterr().out
