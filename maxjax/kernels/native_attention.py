"""Attention over the paged KV cache by the native CPU kernels (``kernels/native``), called through the XLA FFI.

Each reads and writes the cache where it is, through the rows' block tables ``pages`` [B, P] (see
``maxjax.kernels.paged``: position p of row b is page ``pages[b, p // page_size]``, offset ``p % page_size``).
Their XLA references: ``maxjax.architectures.attention.attention`` over ``paged.gather_pages``, and
``paged.write_pages``. They serve float32 on one CPU device only (mesh programs are traced with the native
kernels disabled); the ``*_serves`` predicates say when.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.kernels import native
from maxjax.kernels.paged import block_table

CHUNK_ATTENTION_TARGET = "maxjax_chunk_attention"  # FFI targets (maxjax.kernels.native.KERNELS)
CACHE_WRITE_TARGET = "maxjax_cache_write"
DECODE_ATTENTION_TARGET = "maxjax_decode_attention"


def chunk_kernel_serves(head_dim: int, *dtypes: Any) -> bool:
    """Whether the native chunk attention can run: float32 operands on the CPU with the native kernels and a head
    size the kernel's vectors divide."""
    return (all(d == jnp.float32 for d in dtypes) and head_dim % 16 == 0
            and native.ffi_target(CHUNK_ATTENTION_TARGET) is not None)


def decode_kernel_serves(*dtypes: Any) -> bool:
    """Whether the native decode attention can run: float32 on the CPU with the native kernels."""
    return all(d == jnp.float32 for d in dtypes) and native.ffi_target(DECODE_ATTENTION_TARGET) is not None


def chunk_attention_in_place(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: Any, pages: jax.Array,
                             mask: jax.Array, rotation: tuple[jax.Array, jax.Array] | None, scale: float | None,
                             heads: int) -> jax.Array:
    """Attention without a soft cap of a chunk of queries over keys and values read where they are: key j of
    row b is position j of its pages (j < S, mask [B, T, S]).
    ``q`` [B, T, C]: the ``heads`` query heads in its first heads * Dh columns (C wider: a fused q | k | v
    projection as it comes), rotated by ``rotation`` = (cos, sin) [B, T, Dh] in the kernel (None: q comes
    rotated); ``layer`` may be traced (a scanned layer body). Each query tile's scores stay in cache through
    the masked softmax and the product with v, and keys past a tile's last visible one (the causal future of a
    prefill chunk) are skipped. -> [B, T, heads, Dh]."""
    native.ffi_target(CHUNK_ATTENTION_TARGET)  # registered by the check that chose this path; a no-op then
    B, T = q.shape[:2]
    Dh = cache_k.shape[-1]
    none = jnp.zeros((0,), jnp.float32)
    cos, sin = (none, none) if rotation is None else (r.astype(jnp.float32) for r in rotation)
    return jax.ffi.ffi_call(CHUNK_ATTENTION_TARGET, jax.ShapeDtypeStruct((B, T, heads, Dh), jnp.float32))(
        q, cache_k, cache_v, jnp.asarray(layer, jnp.int32), block_table(pages), mask, cos, sin,
        scale=np.float32(Dh ** -0.5 if scale is None else scale))


def write_projection_in_place(cache_k: jax.Array, cache_v: jax.Array, layer: Any, projection: jax.Array,
                              rotation: tuple[jax.Array, jax.Array], pages: jax.Array,
                              positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`paged.write_pages` of both caches from a fused q | k | v projection [B, T, C] as it comes: k is its KVH Dh
    columns before the last KVH Dh (v), rotated by ``rotation`` (cos, sin) [B, T, Dh]. The caches are updated in
    place (their buffers alias the results): this replaces XLA's rotation, layout and scatter kernels."""
    native.ffi_target(CACHE_WRITE_TARGET)  # registered with the library; a no-op then
    width = cache_k.shape[2] * cache_k.shape[4]  # KVH Dh
    k_col, v_col = projection.shape[-1] - 2 * width, projection.shape[-1] - width
    cos, sin = (r.astype(jnp.float32) for r in rotation)
    return jax.ffi.ffi_call(CACHE_WRITE_TARGET, (jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                                                 jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)),
                            input_output_aliases={3: 0, 4: 1})(
        projection, cos, sin, cache_k, cache_v, jnp.asarray(layer, jnp.int32), block_table(pages),
        positions.astype(jnp.int32), k_col=np.int64(k_col), v_col=np.int64(v_col))


def decode_attention_in_place(qkv: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: int,
                              pages: jax.Array, positions: jax.Array, mask: jax.Array,
                              rotation: tuple[jax.Array, jax.Array] | None, scale: float | None,
                              logit_cap: float | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention over the cache entries ``mask`` [B, 1, S] shows (the current position hidden)
    and each row's new key, reading the pages where they are; keys past a row's last visible one are not read,
    so the cost follows the row's length, not the span. ``qkv`` [B, 1, (H + 2 KVH) Dh] is the new token's
    q | k | v, q and k rotated by ``rotation`` = (cos, sin) [B, 1, Dh] inside the kernel (None: they come
    rotated). -> (attention [B, 1, H, Dh], the new k (rotated) and v [B, 1, KVH, Dh] for the deferred write)."""
    native.ffi_target(DECODE_ATTENTION_TARGET)  # registered by `decode_kernel_serves`; a no-op then
    B = qkv.shape[0]
    KVH, Dh = cache_k.shape[2], cache_k.shape[4]
    H = qkv.shape[-1] // Dh - 2 * KVH
    visible = jnp.concatenate([mask[:, 0], positions >= 0], axis=-1)  # [B, S + 1]: the new key last
    none = jnp.zeros((0,), jnp.float32)
    cos, sin = (none, none) if rotation is None else (r.reshape(B, Dh).astype(jnp.float32) for r in rotation)
    out, k, v = jax.ffi.ffi_call(DECODE_ATTENTION_TARGET, (jax.ShapeDtypeStruct((B, H, Dh), jnp.float32),
                                                           jax.ShapeDtypeStruct((B, KVH, Dh), jnp.float32),
                                                           jax.ShapeDtypeStruct((B, KVH, Dh), jnp.float32)))(
        qkv.reshape(B, -1), cache_k, cache_v, block_table(pages), visible, cos, sin, layer=np.int64(layer),
        scale=np.float32(Dh ** -0.5 if scale is None else scale), softcap=np.float32(logit_cap or 0.0))
    return out.reshape(B, 1, H, Dh), k.reshape(B, 1, KVH, Dh), v.reshape(B, 1, KVH, Dh)
