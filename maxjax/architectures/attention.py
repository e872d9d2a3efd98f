"""Attention over the KV cache: writing new keys/values, which cached positions a query sees, and the
grouped-query attention itself.

Decode attends over a length bucket (kv_len) of the cache. A sliding-window layer (Mistral, Gemma 2/3 local
layers) can see only the last `sliding_window` positions, so when its layer index is static (unrolled layers,
as decode runs them) it gathers just those entries per row: the work of a local layer stays bounded by the
window however long the conversation grows.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from maxjax.kernels import native
from maxjax.kernels.native_attention import (chunk_attention_in_place, chunk_kernel_serves,  # noqa: F401
                                             decode_attention_in_place, decode_kernel_serves,
                                             write_projection_in_place)
from maxjax.kernels.pallas_attention import (merge_new_key, paged_chunk_attention, paged_decode_attention,
                                             pallas_backend)
from maxjax.kernels.paged import gather_pages, gather_positions, write_pages, write_pages_layers  # noqa: F401

# A large finite negative instead of -inf: a fully masked (padding) query row then gets a uniform softmax
# rather than NaN, so garbage in padding rows stays finite.
_MASK_VALUE = -1e30


def visible_keys(cache: Any, cfg: Any, layer_index: Any, pages: jax.Array, positions: jax.Array,
                 mask: jax.Array, kv_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys and values [B, KVH, span, Dh] a layer's queries may see, and the mask [B, T, span] over them, read
    through the rows' block tables ``pages`` [B, P] (``maxjax.kernels.paged``).

    A sliding layer (known when layers are unrolled, as in decode) reads only the window's positions:
    span = sliding_window + T - 1 cache entries ending at each row's last position, instead of all kv_len.
    """
    T = positions.shape[1]
    if not gathers_window(cfg, layer_index, T, kv_len):
        return (gather_pages(cache.k, layer_index, pages, kv_len), gather_pages(cache.v, layer_index, pages, kv_len),
                mask)
    span = cfg.sliding_window + T - 1
    start = jnp.clip(jnp.max(positions, axis=1) - span + 1, 0, kv_len - span)  # [B]
    index = start[:, None] + jnp.arange(span, dtype=jnp.int32)  # [B, span]
    keys = gather_positions(cache.k, layer_index, pages, index)
    values = gather_positions(cache.v, layer_index, pages, index)
    return keys, values, jnp.take_along_axis(mask, index[:, None, :], axis=-1)


def gathers_window(cfg: Any, layer_index: Any, T: int, kv_len: int) -> bool:
    """Whether `visible_keys` gathers a sliding layer's window (a static layer index, a window shorter than the
    kv_len span) rather than reading the span as it is."""
    return (isinstance(layer_index, int) and cfg.is_sliding(layer_index)
            and cfg.sliding_window + T - 1 < kv_len)


def attention_mask(positions: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    """Which cache positions each query may see: [B, T, kv_len] bool (causal by position, optional window)."""
    key_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    query_pos = positions[:, :, None]  # [B, T, 1]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask  # padding queries (position < 0) see nothing


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): bounds scores or logits smoothly to (-cap, cap) (Gemma 2); identity when None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


# Long chunks over long spans attend in blocks of this many queries: one head's scores of a 512-token chunk
# over a 2048 span are 4 MiB, and XLA CPU runs the masked softmax over them far from its caches (measured on
# SmolLM2-135M, a 512-token prefill chunk over 2048 positions: 1.3-1.7x faster in blocks of 128; no gain at a
# 512 span, so shorter spans keep one block).
QUERY_BLOCK = 128
_BLOCKED_SCORES = 512 * 512  # blocks only when T * S exceeds this
CAUSAL_BLOCK = 128  # query block of end-aligned (prefill) chunks: 128 and 64 measured alike at T = S = 512


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
              logit_cap: float | None = None, end_aligned: bool = False) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Dh]; k, v [B, KVH, S, Dh]; mask [B, T, S] -> [B, T, H, Dh].

    Query head h uses kv head h // (H // KVH), as HF's repeat_kv does. Scores and softmax in at least float32.
    Scores are scaled by `scale` (default 1/sqrt(Dh)) and soft-capped at `logit_cap` before masking.
    Each query's softmax is its own, so blocks of queries (long chunks over long spans) give the same result.
    `end_aligned` (prefill chunks, see `steps.prefill_step`): key j is cache position j and query t sits at a
    position <= S - T + t, so a block of queries ending at t never sees keys past S - T + t: each block
    attends over that causal prefix only (a 512-token chunk over its 512 span computes 5/8 of the scores).
    On the CPU with the native kernels (float32, no soft cap) one kernel computes it all instead, skipping each
    query tile's invisible keys itself (`chunk_attention_in_place`).
    """
    if logit_cap is None and chunk_kernel_serves(q.shape[-1], q.dtype, k.dtype, v.dtype):  # k, v: B pages
        B, T, H, Dh = q.shape
        return chunk_attention_in_place(q.reshape(B, T, H * Dh), k[None], v[None], 0,
                                        jnp.arange(B, dtype=jnp.int32), mask, None, scale, H)
    T, S = q.shape[1], k.shape[2]
    block = CAUSAL_BLOCK if end_aligned else QUERY_BLOCK
    if T > block and T % block == 0 and (end_aligned or T * S > _BLOCKED_SCORES):
        outs = []
        for i in range(0, T, block):
            seen = S - T + i + block if end_aligned else S  # keys any query of this block may see
            outs.append(_attention(q[:, i:i + block], k[:, :, :seen], v[:, :, :seen], mask[:, i:i + block, :seen],
                                   scale, logit_cap))
        return jnp.concatenate(outs, axis=1)
    return _attention(q, k, v, mask, scale, logit_cap)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None,
               logit_cap: float | None) -> jax.Array:
    """`attention` over all of q's queries at once."""
    B, T, H, Dh = q.shape
    KVH = k.shape[1]
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)
    q = _scaled(q, scale).reshape(B, T, KVH, H // KVH, Dh)  # [B, T, KVH, G, Dh]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(score_dtype)  # [B, KVH, G, T, S]
    scores = softcap(scores, logit_cap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    # Softmax normalized after the product with v: one multiply over [T, Dh] per head instead of one over the
    # [T, S] probabilities (a pass over every score less).
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # [B, KVH, G, T, S]
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, KVH, G, T, 1]
    # Output in the operands' order, then transposed: asking XLA CPU for btkgd directly keeps a slow
    # standalone dot (measured 70 -> 56 ms per batch-32 decode step of SmolLM2-135M with this form).
    out = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(v.dtype), v)  # [B, KVH, G, T, Dh]
    out = (out / total.astype(out.dtype)).transpose(0, 3, 1, 2, 4)  # [B, T, KVH, G, Dh]
    return out.reshape(B, T, H, Dh)


def _scaled(q: jax.Array, scale: float | None) -> jax.Array:
    """q times the score scale (default 1/sqrt(Dh)): a pass over [T, H, Dh], folded into q's rope, rather than one
    over the [T, S] scores; multiplied in at least float32, so a bfloat16 q is rounded once."""
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)
    return (q * jnp.asarray(1 / math.sqrt(q.shape[-1]) if scale is None else scale, score_dtype)).astype(q.dtype)


def chunk_reads_cache_in_place(cache: Any, dtype: Any, cfg: Any, layer_index: Any, T: int, kv_len: int,
                               logit_cap: float | None) -> bool:
    """Whether a chunk of T queries (a prefill chunk, a multi-token step) attends by `chunk_attention_in_place`
    over the cache itself: the kernel can run, no soft cap, the span read as it is (not a gathered window)."""
    return (logit_cap is None and not gathers_window(cfg, layer_index, T, kv_len)
            and chunk_kernel_serves(cfg.head_dim, cache.k.dtype, dtype))


def hide_current(mask: jax.Array, positions: jax.Array) -> jax.Array:
    """A mask [B, T, kv_len] that also hides each query's own position (and any later one): the cache entries a
    query sees when its own key is not written yet but appended (`with_new_key`)."""
    key_pos = jnp.arange(mask.shape[-1], dtype=jnp.int32)  # [S]
    return mask & (key_pos < positions[:, :, None])


def with_new_key(keys: jax.Array, values: jax.Array, mask: jax.Array, positions: jax.Array, k: jax.Array,
                 v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys/values [B, KVH, S, Dh] read from a cache that does not hold the current token yet (mask from
    `hide_current`), with that token's own k, v [B, 1, KVH, Dh] appended as key S, visible to real queries.

    Why: decode can then write every layer's new K/V with one scatter after the last layer
    (`write_cache_layers`) instead of two scatters (and their index arithmetic) per layer.
    """
    keys = jnp.concatenate([keys, k.transpose(0, 2, 1, 3).astype(keys.dtype)], axis=2)  # [B, KVH, S + 1, Dh]
    values = jnp.concatenate([values, v.transpose(0, 2, 1, 3).astype(values.dtype)], axis=2)
    return keys, values, jnp.concatenate([mask, (positions >= 0)[:, :, None]], axis=-1)  # [B, 1, S + 1]


def reads_cache_in_place(cache: Any, dtype: Any) -> bool:
    """Whether `decode_attention_in_place` can serve a decode step: float32 on the CPU with the native kernels."""
    return decode_kernel_serves(cache.k.dtype, dtype)


def pallas_serves(layer_index: Any) -> bool:
    """Whether a layer attends by the Pallas paged kernels (``maxjax.kernels.pallas_attention``): on a GPU (or
    the CPU in interpret mode), one device (mesh programs trace with custom kernels off), a static layer index
    (its sliding window is known)."""
    return isinstance(layer_index, int) and pallas_backend() and native.enabled()


def _scale_of(head_dim: int, scale: float | None) -> float:
    return head_dim ** -0.5 if scale is None else scale


def pallas_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: Any, cfg: Any, layer_index: int,
                            pages: jax.Array, positions: jax.Array, scale: float | None) -> jax.Array:
    """A decode step's attention (q [B, 1, H, Dh]) over the cache positions before each row's own (its k, v
    [B, 1, KVH, Dh] not written yet: merged exactly by their log-sum-exp), within the layer's sliding window.
    Reads only the pages a row's length reaches. -> [B, 1, H, Dh] in q's dtype."""
    position = positions[:, 0]
    window = cfg.sliding_window if cfg.is_sliding(layer_index) else None
    starts = jnp.zeros_like(position) if window is None else jnp.maximum(position - window + 1, 0)
    s, cap = _scale_of(q.shape[-1], scale), cfg.attn_logit_softcap
    out, lse = paged_decode_attention(q[:, 0], cache.k, cache.v, layer_index, pages, starts,
                                      jnp.maximum(position, 0), scale=s, softcap=cap)
    out = merge_new_key(out, lse, q[:, 0], k[:, 0], v[:, 0], scale=s, softcap=cap)
    return out[:, None].astype(q.dtype)


def pallas_chunk_attention(q: jax.Array, cache: Any, cfg: Any, layer_index: int, pages: jax.Array,
                           positions: jax.Array, scale: float | None) -> jax.Array:
    """A chunk's attention (q [B, T, H, Dh], its keys already written) over the rows' pages, causal by position
    and within the layer's sliding window. -> [B, T, H, Dh] in q's dtype."""
    window = cfg.sliding_window if cfg.is_sliding(layer_index) else None
    return paged_chunk_attention(q, cache.k, cache.v, layer_index, pages, positions,
                                 scale=_scale_of(q.shape[-1], scale), softcap=cfg.attn_logit_softcap,
                                 sliding_window=window).astype(q.dtype)
