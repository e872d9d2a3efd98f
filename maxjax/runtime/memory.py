"""How much KV cache to allocate: the page pool's size from a stated budget.

Why a budget and not the slots' worst case: pages follow the tokens held, so the pool only has to hold what runs
at once. On a GPU/TPU the cache takes a share of the memory the weights leave (the accelerator is there to serve);
on a CPU, whose memory the rest of the machine shares, the default holds ``max_batch_size`` sequences of
``CPU_TOKENS_PER_SEQUENCE`` tokens (32 chats of 1k tokens by default), capped by a share of the free memory.
``kv_cache_memory`` (bytes) or ``num_pages`` override both.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from maxjax.weights.quantize import weight_bytes

MAX_DEFAULT_SLOTS = 32  # sequences held at once by default (beyond this a CPU decode step is compute-bound)
CPU_TOKENS_PER_SEQUENCE = 1024  # the CPU default budget: max_batch_size sequences of this many tokens
CPU_SHARE = 4  # ... but at most 1/CPU_SHARE of the memory the weights leave free
ACCELERATOR_SHARE = 0.5  # the share of a GPU/TPU's memory beside the weights the cache takes by default


def device_memory_bytes(device: Any = None) -> int:
    """Memory of one device: the allocator's limit on a GPU/TPU, physical RAM on the CPU."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_bytes_per_token(arch: Any, model_config: Any, dtype: Any) -> int:
    """Bytes of K and V one position takes over all layers."""
    cache = jax.eval_shape(lambda: arch.init_kv_cache(model_config, 1, 1, dtype))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))


def default_kv_budget(config: Any, bytes_per_token: int, weights: int, memory: int, backend: str) -> int:
    """The default KV cache bytes (module docstring)."""
    free = max(0, memory - weights)
    if backend != "cpu":
        return int(free * ACCELERATOR_SHARE)
    wanted = config.max_batch_size * CPU_TOKENS_PER_SEQUENCE * bytes_per_token
    return min(wanted, free // CPU_SHARE)


def num_pages_for(config: Any, arch: Any, model_config: Any, params: Any, dtype: Any) -> int:
    """The pool's page count: ``config.num_pages``, else what ``kv_cache_memory`` or the default budget holds (at
    least one prefill chunk's worth), a multiple of the mesh's data_parallel. Prompts longer than the pool are
    refused when they arrive."""
    if config.num_pages is not None:
        pages = config.num_pages
    else:
        per_page = kv_bytes_per_token(arch, model_config, dtype) * config.page_size
        budget = config.kv_cache_memory
        if budget is None:
            memory = device_memory_bytes() * config.num_devices
            weights = 0 if callable(params) else weight_bytes(params)  # a lazy reader (mesh): placed later
            budget = default_kv_budget(config, per_page // config.page_size, weights, memory,
                                       jax.default_backend())
        pages = max(budget // per_page, config.pages_per_row(config.max_prefill_len))
    dp = config.data_parallel
    return -(-pages // dp) * dp
