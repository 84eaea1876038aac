"""`llama3 plan` (plan.py): the trainer's real steps compiled for compile-only TPU devices.

Needs libtpu (`pip install llama_jax[tpu]`) for the compiling tests; they skip without it.
Topology parsing and the missing-libtpu message are checked everywhere. The GPU targets
(`h100-8`, at the end) need jax's CUDA plugin (`pip install llama_jax[gpu-plan]`), no GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from jaxlib import xla_client

from llama_jax import cli, cuda_plugin, tpu_plugin
from llama_jax.model.config import get_config
from llama_jax.training import experiment, plan, plan_gpu

HAS_LIBTPU = tpu_plugin.installed()
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


@pytest.mark.parametrize("name", ["v5e-3", "b200-8", "v5e:4y4", "v4-7", "tpu", "h100-12"])
def test_bad_topology_names(name):
    with pytest.raises(ValueError, match="topology|slice"):
        plan.parse_topology(name)


def test_without_libtpu_one_line(monkeypatch, capsys):
    """No libtpu: exit 1 and one line naming the extra to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
    )
    plan.topology_devices.cache_clear()
    rc = cli.main(
        ["plan", "--config", "experiments/llama3_2_1b.py:runlocal", "--topology", "v5e-4"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["error: " + plan.TPU_HINT]
    plan.topology_devices.cache_clear()


# ----------------------------------------------------------------------------- FLOPs (CPU)
def _cpu_step_flops(compile=True, **overrides):
    """(dot_flops of the train step's jaxpr, the CPU compiler's cost_analysis FLOPs, tokens,
    model config) for a small experiment on one CPU device (no libtpu needed)."""
    model = {"dim": 256, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64, "mlp_dim": 512}
    model |= {"vocab_size": 512, "n_layers": 4}
    c = tiny(**{f"model.{k}": v for k, v in model.items()}, **overrides)
    steps = plan.build_steps(c, jax.devices()[:1])
    with jax.set_mesh(steps.mesh), DEFAULT_PRECISION():
        traced = steps.train_step.trace(steps.state, steps.batch, steps.base)
        cost = traced.lower().compile().cost_analysis() if compile else {"flops": None}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return plan.dot_flops(traced.jaxpr), cost["flops"], c.batch_size * c.seq_len, steps.model_cfg


@pytest.fixture(scope="module")
def unrolled():
    """No loops: layers unscanned, full-logits loss, no gradient accumulation, so the
    compiler's cost_analysis counts every op once (its loop bodies count once)."""
    return _cpu_step_flops(
        **{"model.scan_layers": False, "model.remat_policy": "none", "loss_chunk_tokens": 0}
    )


def test_step_flops_match_the_compiler_unrolled(unrolled):
    """The jaxpr count equals XLA's own cost analysis of the loop-free step, to the elementwise
    work the compiler also counts (softmax, norms, AdamW: under 5% at this size)."""
    ours, compiler, _, _ = unrolled
    assert 0.95 * compiler <= ours <= compiler, (ours, compiler)


def test_step_flops_match_6nd_plus_attention(unrolled):
    """remat none, XLA attention: 6 * matmul params + 12 L T N H per token (within 1%); remat
    full recomputes the layers' forward: 8 and 16 instead."""
    ours, _, tokens, cfg = unrolled
    assert ours == pytest.approx(cfg.flops_per_token(128) * tokens, rel=0.01)
    full, _, _, _ = _cpu_step_flops(compile=False, **{"model.remat_policy": "full"})
    attn = 16 * cfg.n_layers * 128 * cfg.n_heads * cfg.head_dim
    # The head's matmuls are outside the remat blocks: 6, not 8, times its weights; and the
    # backward recomputes no down projection (its output feeds only the residual sum).
    params = cfg.matmul_param_count() - cfg.vocab_size * cfg.dim
    down = cfg.n_layers * cfg.dim * cfg.mlp_dim
    want = (8 * params - 2 * down + 6 * cfg.vocab_size * cfg.dim + attn) * tokens
    assert full == pytest.approx(want, rel=0.01)


def test_step_flops_count_the_splash_kernel(unrolled):
    """Splash (Pallas; the compiler counts it as zero) counts its blocks: the forward's 4 L T N H
    per token as XLA's, the backward's dq kernel 6 (QK^T again, dP, dQ) and dkv kernel 8 (QK^T,
    dV, dP, dK) where XLA's backward does 8 in all: 6 L T N H more per token."""
    xla, _, tokens, cfg = unrolled
    splash, _, _, _ = _cpu_step_flops(
        compile=False,
        **{"model.attention_impl": "splash", "model.remat_policy": "none", "loss_chunk_tokens": 0},
    )
    extra = 6 * cfg.n_layers * 128 * cfg.n_heads * cfg.head_dim * tokens
    assert splash - xla == pytest.approx(extra, rel=0.01), (splash - xla, extra)


def test_step_flops_count_scanned_loops(unrolled):
    """The real step's loops (scanned layers, a chunked loss, accumulated microbatches), where
    cost_analysis sees one layer, one chunk and one microbatch, count as the loop-free step."""
    flat, _, _, _ = unrolled
    ours, _, _, _ = _cpu_step_flops(
        compile=False,
        **{"model.remat_policy": "none", "loss_chunk_tokens": 256, "grad_accum_steps": 2},
    )
    assert ours == pytest.approx(flat, rel=1e-3)


# ----------------------------------------------------------------------------- compiling
# Each TPU compile of the tiny step takes ~15-20 s here, so the file compiles 10 times in all:
# the train step of each kernel x dtype, the eval step of one per kernel and per dtype (it is
# the train step's forward), remat none / full / half the batch, and one step too big for the
# chip. The compiles run at the default matmul precision, as a TPU run does
# (conftest.py's "highest" triples the TPU compile time, and Mosaic refuses it in splash).
WITH_EVAL = {("xla", "float32"), ("splash", "bfloat16")}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """plan() of the tiny experiment in both kernels and both compute dtypes; xla/float32
    through `plan.run`, what the CLI calls, as its --json file."""
    if not HAS_LIBTPU:
        pytest.skip("libtpu is not installed (pip install llama_jax[tpu])")
    out = {}
    json_out = tmp_path_factory.mktemp("plan") / "plan.json"
    for impl in ("xla", "splash"):
        for dtype in ("float32", "bfloat16"):
            c = tiny(**{"model.attention_impl": impl, "model.dtype": dtype})
            with DEFAULT_PRECISION():
                if (impl, dtype) == ("xla", "float32"):
                    assert plan.run(c, TOPOLOGY, str(json_out)) == 0
                    out[impl, dtype] = json.loads(json_out.read_text())
                else:
                    out[impl, dtype] = plan.plan(c, TOPOLOGY, with_eval=(impl, dtype) in WITH_EVAL)
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
    if (impl, dtype) in WITH_EVAL:
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
    """The compiler's temporaries fall when remat goes none -> full, and when the batch halves.
    16 rows of 256 per chip: the activations a layer keeps for the backward outweigh the
    step's fixed buffers (at the fixture's 2 rows of 128 they do not: ~5.6 MB either way)."""
    base = {"seq_len": 256, "batch_size": 64}
    temps = {}
    for name, extra in [
        ("none", {"model.remat_policy": "none"}),
        ("full", {"model.remat_policy": "full"}),
        ("half", {"model.remat_policy": "none", "batch_size": 32}),
    ]:
        with DEFAULT_PRECISION():
            r = plan.plan(tiny(**{**base, **extra}), TOPOLOGY, with_eval=False)
        temps[name] = r["per_chip_bytes"]["temporaries"]
    assert temps["full"] < temps["none"], temps
    assert temps["half"] < temps["none"], temps


def _plan_cli(tmp_path, capsys, *overrides):
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", "experiments/llama3_2_1b.py:runlocal", "--topology", TOPOLOGY]
    with DEFAULT_PRECISION():
        rc = cli.main([*argv, *overrides, "--json", str(out)])
    return rc, capsys.readouterr().out.strip().splitlines(), json.loads(out.read_text())


@needs_libtpu
def test_too_big_exits_2_with_one_line(tmp_path, capsys):
    """Temporaries too big for a v5e chip (8 rows of 8192 per chip, XLA attention's [T, T]
    scores kept for the backward): the TPU compiler refuses the step; exit 2 and one line
    saying by how much and what helps."""
    long = ["--config.seq_len=8192", "--config.model.max_seq_len=8192"]
    rc, lines, report = _plan_cli(
        tmp_path, capsys, *long, "--config.batch_size=32", "--config.model.remat_policy=none"
    )
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("does not fit: ") and "GiB per chip needed" in lines[0], lines
    assert "remat_policy=full" in lines[0] and "batch" in lines[0] and "fsdp" in lines[0]
    assert report["fits"] is False and report["required"] > 16 * 1024**3


@needs_libtpu
def test_state_too_big_exits_2_before_compiling(tmp_path, capsys):
    """Parameters + AdamW moments over the chip's HBM (a 2M-token vocabulary): refused from
    the sharded shapes alone, before any compile; batch and remat are not offered."""
    big = ["--config.model.vocab_size=2097152", "--config.model.dim=2048"]
    rc, lines, report = _plan_cli(tmp_path, capsys, *big, "--config.model.n_heads=16")
    assert rc == 2 and len(lines) == 1, lines
    assert "GiB per chip for the parameters and optimizer state alone" in lines[0], lines
    assert "fsdp" in lines[0] and "remat" not in lines[0] and "batch" not in lines[0]
    # 2 * V * D float32 params (untied head) and two AdamW moments, over 4 chips.
    assert report["required"] >= 3 * 2 * 2097152 * 2048 * 4 / 4


@needs_libtpu
def test_json_keys(reports):
    r = reports["xla", "float32"]  # as plan.run wrote it
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


# ----------------------------------------------------------------------------- GPU targets
HAS_CUDA_PLUGIN = cuda_plugin.library_path() is not None
CUDA_SKIP = "jax's CUDA plugin is not installed (pip install llama_jax[gpu-plan])"
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason=CUDA_SKIP)


@pytest.mark.parametrize(
    "name, topology, chips",
    [("h100-8", "1x1x8", 8), ("a100-4", "1x1x4", 4), ("h200-16", "1x2x8", 16)],
)
def test_gpu_topology_names(name, topology, chips):
    chip, topo, n = plan.parse_topology(name)
    assert (chip.kind, topo, n) == ("GPU", topology, chips)
    spec = plan_gpu.GPUS[name.split("-")[0]]
    # jax's allocator gives XLA 75% of the card unless told otherwise.
    assert chip.hbm_bytes == int(spec.memory_bytes * plan_gpu.memory_fraction())


def test_without_cuda_plugin_one_line(monkeypatch, capsys):
    """No CUDA plugin: exit 1 and one line naming the extra, before any config work."""
    monkeypatch.setattr(cuda_plugin, "library_path", lambda: None)
    monkeypatch.setattr(xla_client, "pjrt_plugin_loaded", lambda name: False)
    plan_gpu.gpu_devices.cache_clear()
    rc = cli.main(
        ["plan", "--config", "experiments/llama3_2_1b.py:runlocal", "--topology", "h100-8"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["error: " + plan_gpu.GPU_HINT]
    plan_gpu.gpu_devices.cache_clear()


@needs_cuda_plugin
def test_plan_h100_compiles_both_steps():
    """The tiny experiment on 8 compile-only H100s: XLA's GPU compiler builds both steps; FSDP
    over 8 GPUs holds an eighth of every matrix plus the replicated norms per GPU."""
    with DEFAULT_PRECISION():
        r = plan.plan(tiny(), "h100-8")
    devices = plan_gpu.gpu_devices(plan_gpu.GPUS["h100"], "1x1x8")
    assert {d.device_kind for d in devices} == {"NVIDIA H100 80GB HBM3"}  # our target config
    assert r["chips"] == 8 and r["details"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["per_chip_bytes"]["params"] == _hand_param_bytes(8)
    assert r["per_chip_bytes"]["optimizer"] >= 2 * r["per_chip_bytes"]["params"]
    assert r["fits"] and 0 < r["per_chip_bytes"]["total"] < r["hbm_bytes_per_chip"]
    assert r["eval"]["total"] > r["eval"]["params"] > 0 and r["eval"]["fits"]
    assert r["details"]["bytes_accessed_per_chip"] is None  # no cost analysis without a GPU
    assert r["flops_per_step"] > 0 and 0 < r["mfu_bound"] <= 1.0
    assert r["collectives"].get("all-gather", 0) > 0
    for impl, why in [("splash", "TPU kernel"), ("cudnn", "without a GPU")]:
        with pytest.raises(ValueError, match=f"'{impl}' .*{why}.*attention_impl=xla"):
            plan.plan(tiny(**{"model.attention_impl": impl}), "h100-8")


@needs_cuda_plugin
@pytest.mark.skipif(cuda_plugin.has_driver(), reason="this host has an NVIDIA driver")
def test_cuda_plugin_stays_out_of_cpu_runs():
    """With the plugin installed and JAX_PLATFORMS unset, a CPU run of llama_jax (what `llama3`
    imports) is as without it: CPU backend, no CUDA driver lines or plugin traceback on stderr,
    and jax never imports the plugin's kernels."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    script = (
        "import llama_jax.cli, sys, jax, jax.numpy as jnp\n"
        "print(jax.default_backend(), float(jnp.ones(3).sum()))\n"
        "print(sys.modules['jax_cuda12_plugin'], sys.modules['jax_plugins.xla_cuda12'].__doc__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    for noise in ("cuda", "plugin", "traceback"):
        assert noise not in done.stderr.lower(), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "cpu 3.0" and lines[1].startswith("None jax's CUDA PJRT plugin, kept asleep")


@needs_libtpu
@pytest.mark.skipif(tpu_plugin.has_tpu(), reason="this host has a TPU")
def test_libtpu_stays_out_of_cpu_runs():
    """With libtpu installed (the tpu extra, for `plan`) and JAX_PLATFORMS unset, `llama3`'s
    CPU runs do not probe for a TPU: no libtpu lines on stderr (the README demo printed its
    accelerator-type warnings, an E0000 TPU_WORKER_HOSTNAMES error and a "Source Location
    Trace" in every command), and `plan` still compiles for TPU chips in the same process."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    script = (
        "import llama_jax.cli, os, jax, jax.numpy as jnp\n"
        "print(jax.default_backend(), float(jnp.ones(3).sum()), os.environ['JAX_PLATFORMS'])\n"
        "from llama_jax.training import plan\n"
        "chip, topology, _ = plan.parse_topology('v5e-4')\n"
        "print(plan.chip_devices(chip, topology)[0].device_kind)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    for noise in ("tpu", "e0000", "source location", "traceback"):
        assert noise not in done.stderr.lower(), done.stderr
    assert done.stdout.splitlines() == ["cpu 3.0 cpu", "TPU v5 lite"]


@pytest.mark.parametrize(
    "env, tpu, driver, chosen",
    [
        ({}, False, False, "cpu"),  # libtpu for plan only: CPU without the probe
        ({"JAX_PLATFORMS": "tpu,cpu"}, False, False, "tpu,cpu"),  # the user's choice stands
        ({"JAX_FORCE_TPU_INIT": "1"}, False, False, None),  # jax's own override
        ({}, True, False, None),  # a TPU VM: jax finds its TPU
        ({}, False, True, None),  # a GPU host: left to jax
    ],
)
def test_libtpu_keep_asleep_decides(monkeypatch, env, tpu, driver, chosen):
    for k in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tpu_plugin, "installed", lambda: True)
    monkeypatch.setattr(tpu_plugin, "has_tpu", lambda: tpu)
    assert tpu_plugin.keep_asleep(gpu_host=driver) == (chosen == "cpu" and not env)
    assert os.environ.get("JAX_PLATFORMS") == chosen
