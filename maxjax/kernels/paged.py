"""The paged KV cache's reads and writes in XLA ops: the reference every other kernel is tested against, and
the path that runs on every backend.

Layout: each cache is [L, num_pages, KVH, page_size, Dh]. A row's block table ``pages`` [B, P] lists its pages in
order, so position p of row b lives at page ``pages[b, p // page_size]``, offset ``p % page_size``. A 1-D
``pages`` [B] is a table of one page per row: with pages of ``max_seq_len`` positions that is a cache of one slot
per sequence. Positions < 0 (padding) or past the table write nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_table(pages: jax.Array) -> jax.Array:
    """``pages`` as an int32 [B, P] block table (a 1-D [B] is one page per row)."""
    pages = jnp.asarray(pages, jnp.int32)
    return pages[:, None] if pages.ndim == 1 else pages


def page_coordinates(cache_kv: jax.Array, pages: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(page, offset) of positions [B, T] of rows with block table ``pages`` [B, P]; padding and positions past
    the table get page ``num_pages`` (out of range: a scatter drops it)."""
    num_pages, page_size = cache_kv.shape[1], cache_kv.shape[3]
    P = pages.shape[1]
    inside = (positions >= 0) & (positions < P * page_size)
    index = jnp.clip(positions // page_size, 0, P - 1)
    page = jnp.where(inside, jnp.take_along_axis(pages, index, axis=1), num_pages)
    return page, jnp.where(inside, positions % page_size, 0)


def gather_pages(cache_kv: jax.Array, layer: jax.Array, pages: jax.Array, kv_len: int) -> jax.Array:
    """Keys or values [B, KVH, kv_len, Dh] of positions 0..kv_len-1 of each row (a copy out of the pages)."""
    page_size = cache_kv.shape[3]
    if pages.shape[1] == 1:  # one page per row (the slot layout): read the span only
        return cache_kv[layer, pages[:, 0], :, :kv_len]
    held = cache_kv[layer, pages]  # [B, P, KVH, page_size, Dh]
    B, P, KVH, _, Dh = held.shape
    return held.transpose(0, 2, 1, 3, 4).reshape(B, KVH, P * page_size, Dh)[:, :, :kv_len]


def gather_positions(cache_kv: jax.Array, layer: jax.Array, pages: jax.Array, index: jax.Array) -> jax.Array:
    """Keys or values [B, KVH, span, Dh] at positions ``index`` [B, span] (>= 0, inside the table)."""
    page, offset = page_coordinates(cache_kv, pages, index)
    # Advanced indices split by the head slice: the result is [B, span, KVH, Dh].
    return cache_kv[layer, page, :, offset].transpose(0, 2, 1, 3)


def write_pages(cache_kv: jax.Array, layer: jax.Array, new: jax.Array, pages: jax.Array,
                positions: jax.Array) -> jax.Array:
    """Scatters new [B, T, KVH, Dh] into layer ``layer`` at positions [B, T] of rows with block table ``pages``."""
    page, offset = page_coordinates(cache_kv, pages, positions)
    # Advanced indices split by the head slice: the update is indexed [B, T, KVH, Dh].
    return cache_kv.at[layer, page, :, offset].set(new.astype(cache_kv.dtype), mode="drop")


def write_pages_layers(cache_kv: jax.Array, new: jax.Array, pages: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatters every layer's new [L, B, T, KVH, Dh] in one operation (see `write_pages`)."""
    page, offset = page_coordinates(cache_kv, pages, positions)
    layers = jnp.arange(cache_kv.shape[0], dtype=jnp.int32)[:, None, None]  # [L, 1, 1]
    return cache_kv.at[layers, page[None], :, offset[None]].set(new.astype(cache_kv.dtype), mode="drop")
