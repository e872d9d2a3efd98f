"""The device mesh of a runtime config and the helpers that put host arrays onto it.

One `jax.sharding.Mesh` with axes ("data", "model") over the first data_parallel x tensor_parallel devices of
`jax.devices()` (all processes' devices in a multi-host run, so every process builds the same mesh).
"model" splits heads, MLP width and vocabulary; "data" splits KV cache slots and batch rows.
A config of one device has no mesh: the engine then runs exactly as a single-device program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxjax.architectures.mesh_axes import DATA, MODEL, axis_if_divides
from maxjax.runtime.config import RuntimeConfig

__all__ = ["DATA", "MODEL", "axis_if_divides", "from_callback", "make_mesh", "mesh_of", "put", "rows_spec"]


def make_mesh(config: RuntimeConfig, devices: list | None = None) -> Mesh | None:
    """The ("data", "model") mesh of ``config``, or None for a single device. Raises ValueError when the
    config asks for more devices than there are."""
    return mesh_of(config.tensor_parallel, config.data_parallel, devices)


def mesh_of(tensor_parallel: int, data_parallel: int, devices: list | None = None) -> Mesh | None:
    """The ("data", "model") mesh of data_parallel x tensor_parallel devices; None for one device."""
    count = tensor_parallel * data_parallel
    if count == 1:
        return None
    devices = jax.devices() if devices is None else devices
    if count > len(devices):
        raise ValueError(f"tensor_parallel ({tensor_parallel}) x data_parallel ({data_parallel}) = {count} devices, "
                         f"but only {len(devices)} are available ({devices[0].platform}); on a CPU, "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts gives N devices")
    return Mesh(np.asarray(devices[:count]).reshape(data_parallel, tensor_parallel), (DATA, MODEL))


def rows_spec(mesh: Mesh, array: Any) -> P:
    """Per-row arrays ([B, ...]) split over "data" when the batch divides, replicated otherwise."""
    if np.ndim(array) == 0:
        return P()
    return P(axis_if_divides(mesh, DATA, np.shape(array)[0]))


def put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds whole; each device receives only its slice."""
    return from_callback(host.shape, host.dtype, sharding, lambda index: host[index])


def from_callback(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
                  read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array whose shards come from ``read(index)``, called only for this process's devices (once per
    distinct slice), so a loader never materialises more than one shard's worth of a tensor at a time."""
    cache: dict[str, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = repr(index)
        if key not in cache:  # replicated shards share one host read
            cache[key] = np.ascontiguousarray(read(index), dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, shard)
