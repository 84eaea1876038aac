"""GPU targets for `llama3 plan`: compile-only CUDA devices described to XLA, no GPU needed.

jax's CUDA PJRT plugin compiles for a GPU it is only told about: given a `GpuTargetConfigProto`
(text format; `target_config` writes it from the table below) and a `slices x hosts x GPUs`
topology, it makes compile-only devices ("deviceless compilation"), and `jit(...).lower(...)
.compile()` on them runs XLA's GPU compiler as on the real machine. `memory_analysis()` works;
`cost_analysis()` returns None (plan counts FLOPs in the jaxpr anyway; the roofline then has no
bytes term). The plugin comes without NVIDIA's libraries (`pip install llama_jax[gpu-plan]`,
jax's own `cuda12-local` extra); on a host without a driver llama_jax keeps it asleep
(llama_jax/cuda_plugin.py) and loads its library here.

What the target config needs (xla/stream_executor/device_description.proto): the device's
compute capability (picks the code generator and the fusions: Hopper's TMA/WGMMA paths for
sm_90), SM count, threads and registers per SM and block, shared memory per SM and per block
(opt-in), L2 size, clock, memory size and bandwidth (the cost model and scheduler use them), the
driver's name for the device, and a cuDNN version (9.8: the oldest jax 0.10's CUDA 12 plugin
accepts). The hardware numbers are NVIDIA's (architecture whitepapers and datasheets); memory
sizes are what nvidia-smi reports for each card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys

GiB = 1024**3
MiB = 1024**2
GPU_HINT = (
    "llama3 plan for a GPU needs jax's CUDA plugin (no GPU or CUDA libraries needed): "
    "pip install llama_jax[gpu-plan]"
)
GPUS_PER_HOST = 8  # an HGX / DGX board: 8 GPUs on one NVLink switch


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU model: what XLA's compiler is told, and the roofline's peak numbers."""

    name: str
    device_name: str  # as the driver reports it (jax's device_kind)
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_units_per_sm: int
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block_optin: int  # bytes a block may opt into
    l2_bytes: int
    clock_ghz: float  # boost clock
    memory_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16 tensor-core FLOP/s (the datasheets' figure without sparsity)
    source: str


# SXM boards. A100 80GB: A100 datasheet (nvidia.com/en-us/data-center/a100: bf16 312 TFLOP/s,
# HBM2e 2,039 GB/s) and the Ampere GA100 whitepaper (108 SMs, 164 KB shared memory per SM,
# 40 MB L2, 1,410 MHz). H100: H100 datasheet (nvidia.com/en-us/data-center/h100: SXM5 bf16
# 989.4 TFLOP/s dense, HBM3 3.35 TB/s) and the Hopper whitepaper (132 SMs, 228 KB shared memory
# per SM, 50 MB L2, 1,980 MHz). H200: the same GH100 chip with 141 GB of HBM3e at 4.8 TB/s
# (nvidia.com/en-us/data-center/h200; same 989 TFLOP/s dense bf16).
GPUS = {
    "a100": GpuSpec(
        "a100", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 164 * 1024, 163 * 1024,
        40 * MiB, 1.41, 81920 * MiB, 2039e9, 312e12, "nvidia.com/en-us/data-center/a100",
    ),
    "h100": GpuSpec(
        "h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 228 * 1024, 227 * 1024,
        50 * MiB, 1.98, 81559 * MiB, 3350e9, 989.4e12, "nvidia.com/en-us/data-center/h100",
    ),
    "h200": GpuSpec(
        "h200", "NVIDIA H200", (9, 0), 132, 128, 228 * 1024, 227 * 1024,
        50 * MiB, 1.98, 143771 * MiB, 4800e9, 989.4e12, "nvidia.com/en-us/data-center/h200",
    ),
}  # fmt: skip


def parse_gpu_topology(name: str) -> tuple[GpuSpec, str, int] | None:
    """`h100-8` -> (spec, plugin topology "1x1x8", 8); `h100-16` is two 8-GPU hosts
    ("1x2x8"). None when `name` is not a GPU name (the caller tries the TPU names)."""
    m = re.fullmatch(r"([a-z]\d+)-(\d+)", name.strip().lower())
    if not m or m.group(1) not in GPUS:
        return None
    n = int(m.group(2))
    if 1 <= n <= GPUS_PER_HOST:
        return GPUS[m.group(1)], f"1x1x{n}", n
    if n > 0 and n % GPUS_PER_HOST == 0:
        return GPUS[m.group(1)], f"1x{n // GPUS_PER_HOST}x{GPUS_PER_HOST}", n
    raise ValueError(
        f"bad GPU topology {name!r}: 1 to {GPUS_PER_HOST} GPUs on one host, or a multiple of "
        f"{GPUS_PER_HOST} (whole hosts), e.g. {m.group(1)}-8, {m.group(1)}-16"
    )


def memory_fraction() -> float:
    """The share of a GPU's memory jax gives XLA: its allocator takes 75% unless told
    otherwise (XLA_CLIENT_MEM_FRACTION, or the older XLA_PYTHON_CLIENT_MEM_FRACTION)."""
    for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if os.environ.get(var):
            return float(os.environ[var])
    return 0.75


def target_config(spec: GpuSpec) -> str:
    """The `GpuTargetConfigProto` text the CUDA plugin compiles for."""
    major, minor = spec.compute_capability
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,  # without opting in
        "shared_memory_per_core": spec.shared_memory_per_sm,
        "shared_memory_per_block_optin": spec.shared_memory_per_block_optin,
        "threads_per_core_limit": 2048,
        "core_count": spec.sm_count,
        "fpus_per_core": spec.fp32_units_per_sm,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(spec.hbm_bytes_per_s),
        "l2_cache_size": spec.l2_bytes,
        "clock_rate_ghz": spec.clock_ghz,
        "device_memory_size": spec.memory_bytes,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}"]
    lines += [
        'platform_name: "CUDA"',
        "dnn_version_info { major: 9 minor: 8 patch: 0 }",
        f'device_description_str: "{spec.device_name}"',
    ]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=1)
def _own_c_api():
    """Loads the CUDA PJRT plugin's library (once) when jax has not: no client, no GPU."""
    # Deferred: only a GPU plan needs jaxlib's plugin loader and llama_jax's plugin lookup.
    from jaxlib import xla_client

    from llama_jax import cuda_plugin

    path = cuda_plugin.library_path()
    if path is None:
        raise ImportError(GPU_HINT)
    with _quiet_stderr():  # its CUDA stub logs "Could not find cuda drivers": none are needed
        return xla_client.load_pjrt_plugin_dynamically("cuda", path)


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 (where C++ logs go before absl is set up) to /dev/null; a failed
    load still raises its Python exception with the message."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=8)
def gpu_devices(spec: GpuSpec, topology: str) -> tuple:
    """The compile-only devices of `topology` GPUs of model `spec` (ImportError without the
    plugin)."""
    import jax  # deferred with the rest: a TPU plan never gets here
    from jax.experimental import topologies
    from jaxlib import xla_client

    from llama_jax import cuda_plugin

    if cuda_plugin.library_path() is None and not xla_client.pjrt_plugin_loaded("cuda"):
        raise ImportError(GPU_HINT)
    config = target_config(spec)
    jax.devices()  # jax's plugin discovery first: on a GPU host it loads the plugin itself
    if xla_client.pjrt_plugin_loaded("cuda") and _own_c_api.cache_info().currsize == 0:
        desc = topologies.get_topology_desc("", "cuda", target_config=config, topology=topology)
        return tuple(desc.devices)
    topo = xla_client.make_c_api_device_topology(
        _own_c_api(), "", target_config=config, topology=topology
    )
    return tuple(topo._make_compile_only_devices())
