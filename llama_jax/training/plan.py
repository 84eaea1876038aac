"""`llama3 plan`: compile an experiment's real train and eval steps for a TPU or GPU topology,
from a CPU.

No weights and no data: the train state, the frozen base (LoRA) and a batch are abstract
(`jax.ShapeDtypeStruct` with their `NamedSharding`s) on the compile-only devices libtpu
describes for a topology (`jax.experimental.topologies`), or jax's CUDA plugin for a described
GPU (`h100-8`: plan_gpu.py), over the experiment's own mesh. The
steps are the trainer's (`trainer.jit_steps`: optimizer, schedule, remat, chunked loss, gradient
accumulation, LoRA), so what compiles here is what `llama3 train` runs on that slice.

The TPU compiler then reports per-chip memory (`memory_analysis`) and FLOPs / bytes
(`cost_analysis`, of the per-chip SPMD program; the GPU compiler gives no cost analysis), and
its HLO shows the collectives. From them:

  fits            arguments + outputs - donated aliases + temporaries <= the chip's HBM (on a
                  GPU the share jax's allocator takes: 75% unless XLA_CLIENT_MEM_FRACTION says)
  FLOPs           counted in the step's jaxpr (`dot_flops`): 2 * M * N * K of every matmul, a
                  scan's body times its length, a shard_map body times its shards, a Pallas
                  kernel's body times its grid; remat's recomputation is in the jaxpr, so this
                  is the work the chips do. Not the compiler's cost_analysis, which counts a
                  while-loop body once (the layer scan, gradient accumulation, the loss
                  chunks: ~L-fold under for a scanned model) and a Pallas kernel as zero.
  roofline        max(FLOPs per chip / peak FLOP/s, compiler bytes accessed / HBM bandwidth):
                  a lower bound on the step time (communication and overheads only add to it).
                  The bytes term uses the compiler's count, loop bodies once: a lower bound
                  too, so the roofline stays one.
  MFU bound       model FLOPs per chip per step (ModelConfig.flops_per_token: 6 * matmul params
                  + 12 * L * T * N * H, causal attention not halved; 4 * matmul params with
                  LoRA, whose frozen base takes no weight gradients) / (roofline * peak)

Exit status: 0 fits, 2 compiles but does not fit (one line: by how much, which knob helps),
1 on an error (bad config, unknown topology, libtpu or the CUDA plugin missing).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from llama_jax import tpu_plugin
from llama_jax.model import sharding
from llama_jax.model.config import ModelConfig
from llama_jax.training import experiment, finetune, plan_gpu
from llama_jax.training import trainer as train

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's or GPU's per-chip limits (bf16 dense peak; HBM capacity, what a
    step may use of it, and bandwidth)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float
    cores_per_chip: int  # TensorCores a chip counts for in the `vXX-N` slice names
    source: str
    kind: str = "TPU"


def gpu_chip(spec: plan_gpu.GpuSpec) -> Chip:
    """A GPU as a plan chip: its HBM is the share jax's allocator gives XLA."""
    usable = int(spec.memory_bytes * plan_gpu.memory_fraction())
    return Chip(spec.name, usable, spec.peak_flops, spec.hbm_bytes_per_s, 1, spec.source, "GPU")


# Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/<gen>), per chip.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 2, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 2, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 1, "cloud.google.com/tpu/docs/v6e"),
}
# libtpu's own names for the generations in `gen:AxB[xC]` topology strings.
_LIBTPU_GEN = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# Chip grids of the usual slice sizes (2-D tori for v5e/v6e, 3-D for v4/v5p).
_GRIDS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_GRIDS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
TPU_HINT = "llama3 plan needs libtpu: pip install llama_jax[tpu]"


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """`v5e-16` (slice name: chips for v5e/v6e, TensorCores for v4/v5p), `v5e:4x4`, or
    `h100-8` (GPUs: a100, h100, h200) -> (chip, libtpu or CUDA topology string, chips)."""
    gpu = plan_gpu.parse_gpu_topology(name)
    if gpu is not None:
        spec, topo, n = gpu
        return gpu_chip(spec), topo, n
    valid = (
        f"valid: {', '.join(f'{g}-N' for g in CHIPS)} or GEN:AxB[xC], e.g. v5e-16, v5e:4x4; "
        f"GPUs: {', '.join(f'{g}-N' for g in plan_gpu.GPUS)}, e.g. h100-8"
    )
    m = re.fullmatch(r"(v\d+[a-z]*)([-:])(.+)", name.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"unknown topology {name!r}; {valid}")
    chip, sep, rest = CHIPS[m.group(1)], m.group(2), m.group(3)
    three_d = chip.cores_per_chip == 2
    if sep == ":":
        if not re.fullmatch(r"\d+(x\d+){1,2}", rest):
            raise ValueError(f"bad TPU topology {name!r}; {valid}")
        dims = [int(d) for d in rest.split("x")]
        if three_d and len(dims) == 2:
            dims.append(1)
        return chip, f"{_LIBTPU_GEN[chip.name]}:{'x'.join(map(str, dims))}", math.prod(dims)
    if not rest.isdigit() or int(rest) % chip.cores_per_chip:
        raise ValueError(f"bad TPU slice size in {name!r}; {valid}")
    chips = int(rest) // chip.cores_per_chip
    grid = (_GRIDS_3D if three_d else _GRIDS_2D).get(chips)
    if grid is None:
        sizes = sorted(n * chip.cores_per_chip for n in (_GRIDS_3D if three_d else _GRIDS_2D))
        raise ValueError(f"no {chip.name} slice of {rest}; known sizes: {sizes} (or GEN:AxB)")
    return chip, f"{_LIBTPU_GEN[chip.name]}:{grid}", chips


@functools.lru_cache(maxsize=8)
def topology_devices(topology: str) -> tuple:
    """The compile-only TPU devices of a libtpu topology string (ImportError without libtpu)."""
    if not tpu_plugin.installed():
        raise ImportError(TPU_HINT)
    # Compile-only devices hold no chip: several processes may load libtpu at once (pytest
    # workers, a plan beside a test run) without its one-process lockfile refusing them.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")  # libtpu's INFO/WARNING lines
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    if not tpu_plugin.has_tpu():
        # Off a TPU VM libtpu's start-up asks the VM's metadata for the host bounds and worker
        # hostnames and prints "Failed to find host bounds", an E0000 "unexpected worker
        # hostname" error and a trace when there are none. Compile-only devices run on no
        # host: the topology name alone sets the chips and hosts that are compiled for.
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Deferred: only `plan` needs the topology API (it loads libtpu).
    from jax.experimental import topologies

    return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def chip_devices(chip: Chip, topology: str) -> tuple:
    """The compile-only devices of a parsed topology (ImportError without libtpu / the CUDA
    plugin, naming the extra to install)."""
    if chip.kind == "GPU":
        return plan_gpu.gpu_devices(plan_gpu.GPUS[chip.name], topology)
    return topology_devices(topology)


# ----------------------------------------------------------------------------- abstract step
@dataclasses.dataclass
class Steps:
    """The experiment's jitted steps and their abstract, sharded arguments."""

    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    train_step: Any
    eval_step: Any
    state: Any  # ShapeDtypeStructs with shardings
    batch: dict
    base: Any


def build_steps(c: ml_collections.ConfigDict, devices: list) -> Steps:
    """The trainer's train and eval steps for config `c` over `devices`, and abstract args."""
    experiment.check_ranges(c)
    model_cfg = experiment.model_config(c)
    try:
        mesh = sharding.make_mesh(tuple(c.mesh_shape), devices)
    except ValueError as e:
        raise ValueError(f"{e}; for this topology try --config.mesh_shape='(1,-1,1)'") from None
    train.check_step_config(c, model_cfg, mesh)
    lora_cfg = finetune.lora_config(c)
    # The schedule's length shapes no array: an epoch-based config compiles the same step.
    tx, schedule = train.make_tx(c, c.num_steps if c.num_steps > 0 else 1000)
    init = functools.partial(train.init_state, model_cfg, tx, c.seed, lora_cfg)
    abstract = jax.eval_shape(init)
    state_shardings = sharding.logical_to_sharding(abstract, mesh, sharding.LOGICAL_RULES)
    base_sharding, base = {}, {}
    if lora_cfg is not None:
        dtype = c.base_dtype or model_cfg.param_dtype
        base_sharding, base_shapes = train.base_shardings(model_cfg, mesh, dtype)
        base = _with_shardings(base_shapes, base_sharding)
    train_step, eval_step = train.jit_steps(
        model_cfg, tx, schedule, c, lora_cfg, mesh, state_shardings, base_sharding
    )
    bs = sharding.batch_sharding(mesh)
    rows = (c.batch_size, c.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(rows, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=bs)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    }
    state = _with_shardings(nn.unbox(abstract), state_shardings)
    return Steps(model_cfg, mesh, train_step, eval_step, state, batch, base)


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- FLOPs
def dot_flops(jaxpr: Any) -> float:
    """Matmul FLOPs of a (closed) jaxpr, loops and kernels included (global, not per chip).

    2 * prod(output) * prod(contracted) per `dot_general`; a `scan` body counts `length` times,
    a `shard_map` body (per-shard shapes) once per shard of its manual axes, a `pallas_call`
    body (one block) once per grid step, a `cond` as its costliest branch (splash's skipped
    causal blocks count: the full T x T square, as in `flops_per_token`). A `while` body counts
    once (no static trip count; the train step has none: its loops are scans).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in contract)
            total += 2.0 * k * math.prod(eqn.outvars[0].aval.shape)
            continue
        subs = [dot_flops(j) for j in _sub_jaxprs(params)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
            continue
        times = 1
        if name == "scan":
            times = params["length"]
        elif name == "shard_map":
            times = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
        elif name == "pallas_call":
            times = math.prod(params["grid_mapping"].grid)
        total += times * sum(subs)
    return total


def _sub_jaxprs(params: dict) -> list:
    """The jaxprs an equation's params hold (call bodies, scan/while bodies, cond branches)."""
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, (Jaxpr, ClosedJaxpr)):
                out.append(x)
    return out


# ----------------------------------------------------------------------------- compile + report
def collectives(hlo: str) -> dict[str, int]:
    """Collective ops in compiled HLO text, by kind (async `-start` halves counted once; an op
    inside the layer scan's loop body counts once, though it runs once per layer)."""
    out = {}
    for kind in COLLECTIVES:
        count = len(re.findall(rf"\s{kind}(?:-start)?\(", hlo))
        if count:
            out[kind] = count
    return out


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    args, outs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    return {"arguments": args, "outputs": outs, "aliased": alias, "temporaries": temp}


def _cost(compiled) -> dict[str, float | None]:
    """The compiler's FLOPs and bytes accessed; None each where it has no cost analysis
    (the GPU compiler without a device)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
        return {"flops": None, "bytes": None}
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0))}


class DoesNotFit(Exception):
    """The compiler refused the step for lack of HBM (`RESOURCE_EXHAUSTED`)."""

    def __init__(self, required: float, available: float, message: str, state_only=False):
        super().__init__(message)
        self.required, self.available, self.state_only = required, available, state_only


def _compile(lowered):
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler's OOM is an XlaRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        # "... required (41.31G) exceeds available HBM (15.75G)", or "... memory required for
        # HLO temporaries (56.12G) exceeds ...": the latter leaves out the arguments.
        sizes = re.search(
            r"\(([\d.]+)([KMGT])\)[^()]*exceeds available HBM \(([\d.]+)([KMGT])\)", text
        )
        if not sizes:
            raise
        unit = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
        required = float(sizes.group(1)) * unit[sizes.group(2)]
        available = float(sizes.group(3)) * unit[sizes.group(4)]
        raise DoesNotFit(required, available, text.splitlines()[0]) from None


def check_gpu_attention(impl: str, topology: str) -> None:
    """One line for the attention kernels a GPU plan cannot compile (before any work)."""
    if impl == "splash":
        raise ValueError(
            f"attention_impl='splash' is a TPU kernel; plan {topology} with "
            "--config.model.attention_impl=xla"
        )
    if impl == "cudnn":
        # jax's cuDNN attention asks the installed cuDNN library for its version and the
        # running GPU for its compute capability while it traces: neither exists here.
        raise ValueError(
            f"attention_impl='cudnn' cannot be compiled without a GPU (jax asks the cuDNN "
            f"library and the running GPU while tracing); plan {topology} with "
            "--config.model.attention_impl=xla: XLA's attention keeps the [T, T] scores, so "
            "its memory is an upper bound for cuDNN's flash attention"
        )


def plan(c: ml_collections.ConfigDict, topology: str, with_eval: bool = True) -> dict[str, Any]:
    """Compiles `c`'s train and eval steps for `topology`; returns the report (see module doc).

    with_eval=False skips the eval step (its "eval" entry is then None).

    Raises:
      DoesNotFit: the compiler ran out of HBM (its numbers are in the exception).
    """
    chip, topo, chips = parse_topology(topology)
    if chip.kind == "GPU":
        check_gpu_attention(c.model.attention_impl, topology)
    devices = chip_devices(chip, topo)
    if len(devices) != chips:
        raise ValueError(f"topology {topo} has {len(devices)} devices, expected {chips} chips")
    steps = build_steps(c, devices)
    mesh, cfg = steps.mesh, steps.model_cfg
    # The sharded train state alone is exact (shard shapes) and needs no compile: a config whose
    # state overflows the chip is refused at once (the 8B on 8 chips would compile for minutes).
    state = per_chip_bytes(steps.state) + per_chip_bytes(steps.base)
    if state > chip.hbm_bytes:
        raise DoesNotFit(state, chip.hbm_bytes, "train state > HBM", state_only=True)
    rules = sharding.LOGICAL_RULES
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        traced = steps.train_step.trace(steps.state, steps.batch, steps.base)
        step_flops = dot_flops(traced.jaxpr)
        train_c = _compile(traced.lower())
        train_s = time.perf_counter() - t0
        eval_args = (steps.state["params"], steps.batch, steps.base)
        eval_c = _compile(steps.eval_step.lower(*eval_args)) if with_eval else None
    compile_s = time.perf_counter() - t0
    mem, cost = _memory(train_c), _cost(train_c)
    params = per_chip_bytes(steps.state["params"]) + per_chip_bytes(steps.base)
    optimizer = per_chip_bytes(steps.state["opt_state"])
    total = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
    tokens = c.batch_size * c.seq_len
    per_token = cfg.flops_per_token(c.seq_len)
    if jax.tree.leaves(steps.base):
        # LoRA: the frozen base takes no weight gradients, 4 (not 6) FLOPs per matmul param.
        per_token -= 2.0 * cfg.matmul_param_count()
    model_flops = per_token * tokens / chips  # per chip
    flops = step_flops / chips  # per chip: the batch and the weights split over every chip
    roofline = max(flops / chip.peak_flops, (cost["bytes"] or 0.0) / chip.hbm_bytes_per_s)
    eval_report = None
    if with_eval:
        m = _memory(eval_c)
        eval_report = {
            "params": params,
            "temporaries": m["temporaries"],
            "total": m["arguments"] + m["outputs"] + m["temporaries"],
        }
        eval_report["fits"] = eval_report["total"] <= chip.hbm_bytes
    return {
        "topology": topology,
        "chips": chips,
        "hbm_bytes_per_chip": chip.hbm_bytes,
        "per_chip_bytes": {
            "params": params,
            "optimizer": optimizer,
            "temporaries": mem["temporaries"],
            "total": total,
        },
        "fits": total <= chip.hbm_bytes,
        "flops_per_step": step_flops,
        "roofline_step_seconds": roofline,
        "mfu_bound": model_flops / (roofline * chip.peak_flops) if roofline > 0 else 0.0,
        "collectives": collectives(train_c.as_text()),
        "eval": eval_report,
        # Beyond the keys `--json` promises: what the table also shows.
        "details": {
            "chip": dataclasses.asdict(chip),
            "mesh": dict(mesh.shape),
            "memory": mem,
            "bytes_accessed_per_chip": cost["bytes"],
            "flops_per_chip": flops,
            "compiler_flops_per_chip": cost["flops"],  # loop bodies once: not the step's
            "model_flops_per_chip": model_flops,
            "tokens_per_step": tokens,
            "compile_seconds": {"train": train_s, "total": compile_s},
        },
    }


def advice(
    c: ml_collections.ConfigDict, required: float, available: float, state_only: bool = False
) -> str:
    """One line: by how much a step misses the chip's HBM and the knobs that would help
    (state_only: the parameters and optimizer state alone overflow; batch and remat cannot help)."""
    knobs = []
    if not state_only and c.batch_size // max(c.grad_accum_steps, 1) > 1:
        knobs.append(
            f"a smaller batch per step (--config.grad_accum_steps={2 * c.grad_accum_steps} "
            f"or --config.batch_size={c.batch_size // 2})"
        )
    if c.model.remat_policy != "full" and not state_only:
        knobs.append(f"--config.model.remat_policy=full (now {c.model.remat_policy!r})")
    shape = tuple(c.mesh_shape)
    if shape[0] != 1:
        knobs.append(f"shard params over data too (mesh_shape {shape} -> fsdp)")
    knobs.append("more chips (a larger fsdp axis)")
    what = "for the parameters and optimizer state alone" if state_only else "needed"
    return (
        f"does not fit: {required / GiB:.2f} GiB per chip {what}, {available / GiB:.2f} GiB "
        f"available ({required / available:.2f}x, {(required - available) / GiB:.2f} GiB over); "
        f"try {'; '.join(knobs)}"
    )


def format_report(r: dict[str, Any]) -> str:
    """The one table `llama3 plan` prints."""
    d = r["details"]
    b = r["per_chip_bytes"]
    hbm = r["hbm_bytes_per_chip"]
    gib = lambda x: f"{x / GiB:8.2f} GiB"
    mesh = ", ".join(f"{k}={v}" for k, v in d["mesh"].items())
    chip = d["chip"]
    usable = ""
    if chip["kind"] == "GPU":
        usable = f", jax's share: XLA_CLIENT_MEM_FRACTION={plan_gpu.memory_fraction():g}"
    accessed = d["bytes_accessed_per_chip"]
    rows = [
        f"{r['topology']}: {r['chips']} x {chip['kind']} {chip['name']} chips, mesh {mesh}",
        f"  per chip        params      {gib(b['params'])}",
        f"                  optimizer   {gib(b['optimizer'])}",
        f"                  temporaries {gib(b['temporaries'])}",
        f"                  total       {gib(b['total'])}  of {gib(hbm).strip()} HBM "
        f"({b['total'] / hbm:.0%}{usable}): {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  eval step       total       {gib(r['eval']['total'])}: "
        + ("fits" if r["eval"]["fits"] else "DOES NOT FIT (its batch is not accumulated)")
        if r["eval"]
        else "  eval step       -",
        f"  FLOPs / step    {r['flops_per_step']:.3e} (matmuls in the step, remat included; "
        f"{d['flops_per_chip']:.3e} per chip, model {d['model_flops_per_chip']:.3e})",
        f"  bytes / chip    {accessed:.3e} accessed (compiler; loop bodies once: a lower bound)"
        if accessed is not None
        else "  bytes / chip    - (no cost analysis from this compiler: compute term only)",
        f"  roofline        {r['roofline_step_seconds'] * 1e3:.1f} ms / step "
        f"(peak {d['chip']['peak_flops'] / 1e12:.0f} TFLOP/s, "
        f"{d['chip']['hbm_bytes_per_s'] / 1e9:.0f} GB/s; {d['chip']['source']})",
        f"  MFU bound       {r['mfu_bound']:.1%} (model FLOPs: 6 * matmul params + 12 L T N H "
        "per token; 4 * with LoRA's frozen base)",
        "  collectives     "
        + (", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"),
        f"  compiled in     {d['compile_seconds']['total']:.1f} s on this host",
    ]
    return "\n".join(rows)


def run(c: ml_collections.ConfigDict, topology: str, json_out: str | None = None) -> int:
    """`llama3 plan`: prints the table (or the one-line verdict); returns the exit status."""
    try:
        report = plan(c, topology)
    except DoesNotFit as e:
        print(advice(c, e.required, e.available, e.state_only))
        if json_out:
            _write_json(json_out, {"topology": topology, "fits": False, "required": e.required})
        return 2
    print(format_report(report))
    if json_out:
        _write_json(json_out, report)
    if not report["fits"]:
        total, hbm = report["per_chip_bytes"]["total"], report["hbm_bytes_per_chip"]
        print(advice(c, total, hbm))
        return 2
    return 0


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=lambda x: np.asarray(x).tolist())
        f.write("\n")
