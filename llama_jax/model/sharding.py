"""Mesh construction, the one logical-to-mesh rules table, and sharded initialisation.

Model code names logical axes only (see model.py); this module is the single place that maps
them onto the three mesh axes:

  data    pure data parallelism: parameters replicated, batch split.
  fsdp    data parallelism with parameters, gradients and optimizer state split (ZeRO-3).
  tensor  Megatron-style tensor parallelism: heads, MLP width and vocab split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None: replicated). Parameters and activations use different
# names where they must shard differently (the embed dim of a weight is split over fsdp, the
# embed dim of an activation never is).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(
    shape: Sequence[int], num_devices: int | None = None
) -> tuple[int, int, int]:
    """Fills in a single -1 in (data, fsdp, tensor) with the devices left over."""
    n = jax.device_count() if num_devices is None else num_devices
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape {shape} must have 3 entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1 (the rest)")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(
                f"mesh shape {shape}: {n} devices are not divisible by the fixed axes ({known})"
            )
        shape = tuple(n // known if s == -1 else s for s in shape)
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {n} are in use (jax.device_count()={jax.device_count()})"
        )
    return shape  # type: ignore[return-value]


def make_mesh(
    shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; the default is pure FSDP over every device."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - unusual topologies: fall back to plain order.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def check_model_fits_mesh(config: ModelConfig, mesh: Mesh) -> None:
    """Raises a clear error when the tensor axis does not divide the sharded model dims."""
    t = mesh.shape["tensor"]
    for name in ("n_heads", "n_kv_heads", "mlp_dim", "vocab_size"):
        value = getattr(config, name)
        if value % t:
            raise ValueError(
                f"{name}={value} is not divisible by the mesh's tensor axis ({t}); "
                f"pick a tensor size that divides {name}"
            )
    f = mesh.shape["fsdp"]
    if config.dim % f:
        raise ValueError(f"dim={config.dim} is not divisible by the mesh's fsdp axis ({f})")


def check_batch_fits_mesh(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the batch axes data*fsdp={n}; "
            f"use a multiple of {n}"
        )


def logical_to_sharding(tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Maps a tree of logical PartitionSpecs (or boxed params) to NamedShardings."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch array: B split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def to_host(a: jax.Array) -> np.ndarray:
    """The whole array on the host, gathered from every process when it spans several (each
    process gets it all, so every process can take the same next step)."""
    if a.is_fully_addressable:
        return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def sharded_init(
    init_fn: Callable[..., Any], mesh: Mesh, *args: Any, rules=LOGICAL_RULES
) -> tuple[Any, Any]:
    """Creates `init_fn(*args)` directly on device with its logical shardings.

    `eval_shape` gives the boxed abstract tree (no memory), its logical axes give the
    shardings, and one `jit(init, out_shardings=...)` materialises each shard where it lives.

    Returns:
      (unboxed tree of jax.Arrays, tree of NamedShardings)
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_sharding(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings
