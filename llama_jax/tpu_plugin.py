"""libtpu on a host without a TPU: kept out of jax's backend search, except for `llama3 plan`.

`pip install llama_jax[tpu]` brings libtpu so that `llama3 plan --topology v5e-8` can compile
for TPUs on any host. Left alone, an installed libtpu changes every CPU run with JAX_PLATFORMS
unset: jax's first backend start loads libtpu's library and asks it for a TPU, which costs ~6 s
and prints a dozen lines to stderr ("could not determine TPU accelerator type", an
`E0000 ... INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` error and a "Source Location Trace")
before jax falls back to the CPU, as it must where no TPU exists.

`keep_asleep()` (run by `import llama_jax`, before jax is imported) decides that fall-back up
front: with libtpu installed, JAX_PLATFORMS unset, no TPU on the PCI bus (the check jax itself
uses) and no NVIDIA driver (a GPU host is left to jax), JAX_PLATFORMS becomes `cpu`. `plan`
loads libtpu's compile-only devices itself, so it is unaffected. JAX_FORCE_TPU_INIT, a TPU,
or any JAX_PLATFORMS the user set is left to jax.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips' PCI vendor id (jax's hardware_utils reads the same)


def installed() -> bool:
    """Whether libtpu is installed (what `llama3 plan` needs for TPU topologies)."""
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def has_tpu() -> bool:
    """Whether this host has a TPU chip on its PCI bus."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def keep_asleep(gpu_host: bool) -> bool:
    """Makes jax use the CPU without probing libtpu where no TPU exists (see module doc);
    `gpu_host`: whether the host has an NVIDIA driver. Returns whether it chose the platform."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if not installed() or has_tpu() or gpu_host:
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_platforms is None:  # imported before llama_jax
        jax.config.update("jax_platforms", "cpu")
    return True
