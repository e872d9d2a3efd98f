"""What part of the KV cache a layer's queries read: the whole attention span, or a sliding layer's window.

Decode attends over a length bucket (kv_len) of the cache. A sliding-window layer (Mistral, Gemma 2/3 local
layers) can see only the last `sliding_window` positions, so when its layer index is static (unrolled layers,
as decode runs them) it gathers just those entries per row: the work of a local layer stays bounded by the
window however long the conversation grows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def visible_keys(cache: Any, cfg: Any, layer_index: Any, slots: jax.Array, positions: jax.Array,
                 mask: jax.Array, kv_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys and values [B, KVH, span, Dh] a layer's queries may see, and the mask [B, T, span] over them.

    A sliding layer (known when layers are unrolled, as in decode) reads only the window's positions:
    span = sliding_window + T - 1 cache entries ending at each row's last position, instead of all kv_len.
    """
    T = positions.shape[1]
    span = None
    if isinstance(layer_index, int) and cfg.is_sliding(layer_index):
        span = cfg.sliding_window + T - 1
    if span is None or span >= kv_len:
        return cache.k[layer_index, slots, :, :kv_len], cache.v[layer_index, slots, :, :kv_len], mask
    start = jnp.clip(jnp.max(positions, axis=1) - span + 1, 0, kv_len - span)  # [B]
    index = start[:, None] + jnp.arange(span, dtype=jnp.int32)  # [B, span]
    # Advanced indices split by the head slice: the result is [B, span, KVH, Dh].
    keys = cache.k[layer_index, slots[:, None], :, index].transpose(0, 2, 1, 3)
    values = cache.v[layer_index, slots[:, None], :, index].transpose(0, 2, 1, 3)
    return keys, values, jnp.take_along_axis(mask, index[:, None, :], axis=-1)
