"""jax's CUDA plugin on a host without an NVIDIA driver: asleep, except for `llama3 plan`.

`pip install llama_jax[gpu-plan]` brings jax's CUDA plugin without NVIDIA's libraries
(`jax[cuda12-local]`: the `jax_cuda12_plugin` kernels and the `jax_plugins.xla_cuda12` PJRT
plugin), so that `llama3 plan --topology h100-8` can compile for GPUs on any host. Left alone,
the installed plugin changes every CPU run: `import jax` loads its kernel libraries (each logs
"Could not find cuda drivers on your machine" to stderr), and jax's backend start imports the
PJRT plugin, whose `initialize()` prints a "Jax plugin configuration error" traceback when
JAX_PLATFORMS is unset, and loads its 480 MB library when it is set (seconds).

Where no NVIDIA driver exists neither can do anything but compile, so `keep_asleep()` (the
first thing `import llama_jax` does, before jax is imported) hides both from jax: the kernel
package is marked absent (jaxlib then behaves as without it) and the PJRT plugin's module is
replaced by one whose `initialize()` does nothing. `plan` loads the plugin's library itself
(`library_path`). A host with a driver, or JAX_PLATFORMS naming cuda/gpu, is left to jax.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

PJRT_MODULE = "jax_plugins.xla_cuda12"  # jax-cuda12-pjrt: the compiler and runtime library
KERNELS_MODULE = "jax_cuda12_plugin"  # jax-cuda12-plugin: custom-call kernels, version checks
LIBRARY = "xla_cuda_plugin.so"
_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl")


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # parent package missing; a module without a spec
        return None


def library_path() -> str | None:
    """The CUDA PJRT plugin's library, or None when jax's CUDA plugin is not installed."""
    spec = _spec(PJRT_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], LIBRARY)
    return path if os.path.exists(path) else None


def has_driver() -> bool:
    """Whether this host has an NVIDIA driver (what the plugin needs to run anything)."""
    return any(os.path.exists(f) for f in _DRIVER_FILES)


def keep_asleep() -> bool:
    """Hides jax's CUDA plugin from jax on a host without an NVIDIA driver (see module doc).

    Must run before `import jax` to keep the kernel libraries quiet; later it still keeps the
    PJRT plugin from loading, until jax's backends start. Returns whether it hid anything.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if "cuda" in platforms or "gpu" in platforms or has_driver():
        return False
    if PJRT_MODULE in sys.modules or library_path() is None:
        return False  # already imported by jax (too late to matter), or not installed
    if KERNELS_MODULE not in sys.modules:
        sys.modules[KERNELS_MODULE] = None  # import raises ImportError: "not installed"
    asleep = types.ModuleType(PJRT_MODULE, "jax's CUDA PJRT plugin, kept asleep by llama_jax")
    asleep.initialize = lambda: None  # jax's plugin discovery calls this
    asleep.__spec__ = _spec(PJRT_MODULE)  # library_path() still finds the real files
    sys.modules[PJRT_MODULE] = asleep
    return True
