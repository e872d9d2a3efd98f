"""The JAX platform list on machines without an accelerator plugin.

Without ``JAX_PLATFORMS`` JAX tries every backend it knows, TPU included, and on a CPU-only machine logs
``Unable to initialize backend 'tpu' ... libtpu.so`` at start-up (shown wherever INFO logs are, e.g. ``maxjax
serve``). When neither the user (``JAX_PLATFORMS`` / ``jax_platforms``) nor an installed plugin (``libtpu``, a
``jax_plugins`` module or entry point such as the CUDA/ROCm plugins) says otherwise, the list is set to ``cpu``:
the same backend JAX would end up on, without the failed probe. An installed plugin keeps JAX's own choice, so
its real errors still show.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys


def accelerator_plugin_installed() -> bool:
    """Whether a TPU runtime or any PJRT plugin package is importable."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        if list(importlib.metadata.entry_points(group="jax_plugins")):
            return True
    except Exception:  # noqa: BLE001 -- broken metadata: let JAX decide
        return True
    try:
        import jax_plugins  # type: ignore[import-not-found]
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def default_to_cpu_without_accelerator() -> bool:
    """Sets the platform list to ``cpu`` when nothing chose one and no accelerator plugin is installed (module
    docstring); returns whether it did. A no-op once JAX's backends are initialized."""
    if os.environ.get("JAX_PLATFORMS") or accelerator_plugin_installed():
        return False
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        return True
    import jax

    try:
        from jax._src import xla_bridge  # no public API says whether the backends exist yet

        initialized = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        initialized = True  # cannot tell: leave JAX's choice alone
    if jax.config.jax_platforms or initialized:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
