"""The default number of KV cache slots (``max_batch_size``): as many as the device's memory comfortably holds.

Why: ``LLM`` and the server queue requests beyond the slots, so too few slots serialise a batch that one
decode program could run at once (32 SmolLM2 rows decode ~1.4x faster than 4 calls of 8 on a 2-core CPU),
while a large model's cache must not crowd out its weights.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from maxjax.weights.quantize import weight_bytes

MAX_DEFAULT_SLOTS = 32  # beyond this the decode step is compute-bound on a CPU and compiles get long
CACHE_SHARE = 4  # the cache may use 1/CACHE_SHARE of the memory the weights leave free


def device_memory_bytes(device: Any = None) -> int:
    """Memory of one device: the allocator's limit on a GPU/TPU, physical RAM on the CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def slots_for_memory(bytes_per_slot: int, weight_bytes: int, memory_bytes: int, multiple_of: int = 1) -> int:
    """The largest power of two up to ``MAX_DEFAULT_SLOTS`` whose cache fits 1/CACHE_SHARE of the memory left
    beside the weights; at least ``multiple_of`` (the mesh's data_parallel, which must divide it)."""
    budget = max(0, memory_bytes - weight_bytes) // CACHE_SHARE
    slots = 1
    while slots * 2 <= MAX_DEFAULT_SLOTS and slots * 2 * bytes_per_slot <= budget:
        slots *= 2
    return max(multiple_of, slots // multiple_of * multiple_of)


def default_max_batch_size(arch: Any, model_config: Any, params: Any, max_seq_len: int, dtype: Any,
                           num_devices: int = 1, multiple_of: int = 1) -> int:
    """``slots_for_memory`` for ``arch``'s cache of ``model_config`` over ``num_devices`` devices."""
    cache = jax.eval_shape(lambda: arch.init_kv_cache(model_config, 1, max_seq_len, dtype))
    per_slot = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return slots_for_memory(per_slot, weight_bytes(params), device_memory_bytes() * num_devices, multiple_of)
