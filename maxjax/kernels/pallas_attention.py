"""Attention over the paged KV cache as Pallas kernels: the GPU counterpart of the native CPU kernels, with
pure-jnp references that the tests compare them against.

Layout as in ``maxjax.kernels.paged``: each cache is [L, num_pages, KVH, page_size, Dh]; position p of row b is on
page ``pages[b, p // page_size]``, offset ``p % page_size``. The kernels read the pages where they are, through the
block table, and only the pages a row (or a block of queries) can see, so their cost follows the rows' real
lengths rather than the table's width.

The formulation is the one the Triton (GPU) backend lowers: the cache, the block table and the lengths are whole
arrays in memory, read inside the kernel by scalar loads and gathers (the Triton backend has no scalar prefetch);
loaded blocks are powers of two in size (pages_per_block * page_size keys, Dh 64/128, query rows padded to >= 16
for the matrix units). ``interpret=True`` runs the same kernels on the CPU, which is what the tests check.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from maxjax.kernels.paged import block_table, gather_pages

# A large finite negative instead of -inf (as the model's attention): the lse of a row that sees nothing, and the
# running max before any key, stay finite, so merging them never makes NaN.
MASK_VALUE = -1e30


def pallas_backend() -> bool:
    """Whether attention should go through these kernels: on a GPU, or on the CPU in interpret mode when
    ``MAXJAX_PALLAS_INTERPRET=1`` (to exercise the Pallas path without an accelerator). Not yet on TPU: these
    kernels read the cache by in-kernel gathers (the GPU formulation); a TPU one fetches pages by scalar-prefetch
    index maps instead."""
    return jax.default_backend() == "gpu" or os.environ.get("MAXJAX_PALLAS_INTERPRET") == "1"


def _interpret(interpret: bool | None) -> bool:
    """None: compile on a GPU, interpret elsewhere (the CPU cannot compile Pallas kernels)."""
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    if not interpret and jax.default_backend() == "tpu":
        raise NotImplementedError("the paged attention kernels have no TPU formulation yet (see pallas_backend)")
    return interpret


def _default_pages_per_block(page_size: int) -> int:
    """Pages read per step: blocks of ~64 keys keep the matrix units busy whatever the page size."""
    return max(1, 64 // page_size)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap), as the model's `softcap`; identity when None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _padded_table(pages: jax.Array, pages_per_block: int) -> jax.Array:
    """The block table [B, P + pages_per_block - 1]: a block of pages starting at any page < P stays inside it
    (the extra entries are page 0, and the keys on them are masked)."""
    table = block_table(pages)
    return jnp.pad(table, ((0, 0), (0, pages_per_block - 1)))


def _keys_block(k_ref: Any, v_ref: Any, table_ref: Any, layer: Any, head: Any, page: Any,
                pages_per_block: int) -> tuple[jax.Array, jax.Array]:
    """Keys and values [pages_per_block * page_size, Dh] of table entries page.. of one kv head: one gather."""
    ids = table_ref[pl.ds(page, pages_per_block)]  # [n] page ids
    _, _, _, PS, Dh = k_ref.shape
    k = k_ref[layer, ids, head, :, :].reshape(pages_per_block * PS, Dh)
    v = v_ref[layer, ids, head, :, :].reshape(pages_per_block * PS, Dh)
    return k, v


def _online_softmax_step(carry: tuple, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale: float,
                         softcap: float | None, precision: Any) -> tuple:
    """One flash step: folds a key block into the running (max, sum, unnormalized out) of each query row.
    Invisible keys weigh exactly 0 (not exp(MASK - max)), so a row that sees nothing keeps sum 0."""
    m, l, acc = carry  # [R], [R], [R, Dh]
    s = pl.dot(q, k, trans_b=True, precision=precision) * scale  # [R, K] float32
    s = jnp.where(visible, _softcap(s, softcap), MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = correction * l + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + pl.dot(p.astype(v.dtype), v, precision=precision)
    return m_new, l, acc


def _decode_kernel(layer_ref, starts_ref, lengths_ref, table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
                   scale, softcap, pages_per_block, splits, precision):
    """Program (row b, kv head h, split s): the row's query heads of kv head h over its share of the row's visible
    pages (flash-decoding: splits divide the row's real pages, not the table), looping only over those."""
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    PS = k_ref.shape[3]
    n = pages_per_block
    layer, start, length = layer_ref[0], starts_ref[b], lengths_ref[b]
    first, last = start // PS, (length + PS - 1) // PS  # pages holding visible keys: [first, last)
    count = jnp.maximum(last - first, 0)
    per = ((count + splits - 1) // splits + n - 1) // n * n  # pages of each split, whole blocks
    lo = first + s * per
    hi = jnp.minimum(lo + per, last)
    lo_key, hi_key = jnp.maximum(start, lo * PS), jnp.minimum(length, hi * PS)
    q = q_ref[...]  # [Gp, Dh]

    def body(i, carry):
        page = lo + i * n
        k, v = _keys_block(k_ref, v_ref, table_ref, layer, h, page, n)
        key_pos = page * PS + lax.broadcasted_iota(jnp.int32, (1, n * PS), 1)
        visible = (key_pos >= lo_key) & (key_pos < hi_key)  # [1, K]: every head of the row alike
        return _online_softmax_step(carry, q, k, v, visible, scale, softcap, precision)

    G, Dh = q.shape
    init = (jnp.full((G,), MASK_VALUE, jnp.float32), jnp.zeros((G,), jnp.float32), jnp.zeros((G, Dh), jnp.float32))
    m, l, acc = lax.fori_loop(0, (jnp.maximum(hi - lo, 0) + n - 1) // n, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _compiler_params(interpret: bool) -> Any:
    """The Triton backend's parameters when compiling for a GPU (they also select it over Mosaic GPU)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt  # imported only where a GPU compiles
    return plt.CompilerParams(num_warps=4, num_stages=2)


def _precision(dtype: Any) -> Any:
    """True float32 products for a float32 cache (Triton's default would be TF32); 16-bit operands as they are."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "pages_per_block", "splits", "interpret"))
def paged_decode_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: Any, pages: jax.Array,
                           starts: jax.Array, lengths: jax.Array, *, scale: float, softcap: float | None = None,
                           pages_per_block: int | None = None, splits: int = 1,
                           interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """One query per row over cache positions starts[b] <= j < lengths[b] of the row's pages.

    q [B, H, Dh] (rotated, not scaled); cache_k/v [L, NP, KVH, PS, Dh]; ``layer`` static or traced; pages [B, P];
    starts, lengths [B]. Query head h uses kv head h // (H // KVH). -> (out [B, H, Dh] float32, normalized over
    the visible keys, 0 where none; lse [B, H] float32, MASK_VALUE where none), so that `merge_new_key` can add
    the current token's own key exactly. ``splits`` > 1 divides each row's pages among that many programs
    (flash-decoding: parallelism for few long rows), merged here by their lse. ``pages_per_block`` pages per loop
    step (pages_per_block * PS a power of two on a GPU; default ~64 keys). ``interpret`` None: interpret unless
    on a GPU.
    """
    interpret = _interpret(interpret)
    B, H, Dh = q.shape
    _, _, KVH, PS, _ = cache_k.shape
    G = H // KVH
    Gp = max(16, _pow2(G))  # query rows of a program: a power of two the matrix units take
    n = pages_per_block or _default_pages_per_block(PS)
    qg = q.reshape(B, KVH, G, Dh).astype(cache_k.dtype)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))  # [B, KVH, Gp, Dh]
    table = _padded_table(pages, n)
    whole = pl.BlockSpec()  # a whole array, read by loads inside the kernel
    kernel = functools.partial(_decode_kernel, scale=scale, softcap=softcap, pages_per_block=n, splits=splits,
                               precision=_precision(cache_k.dtype))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(B, KVH, splits),
        in_specs=[whole, whole, whole,
                  pl.BlockSpec((None, table.shape[1]), lambda b, h, s: (b, 0)),  # the row's table
                  pl.BlockSpec((None, None, Gp, Dh), lambda b, h, s: (b, h, 0, 0)),
                  whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, Gp, Dh), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, KVH, splits, Gp, Dh), jnp.float32),
                   jax.ShapeDtypeStruct((B, KVH, splits, Gp), jnp.float32),
                   jax.ShapeDtypeStruct((B, KVH, splits, Gp), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="paged_decode_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(starts, jnp.int32), jnp.asarray(lengths, jnp.int32),
      table, qg, cache_k, cache_v)
    # Merge the splits: each one's sum and output rescaled to the largest running max.
    m_all = jnp.max(m, axis=2)  # [B, KVH, Gp]
    w = jnp.exp(m - m_all[:, :, None])  # [B, KVH, S, Gp]
    l_all = jnp.sum(w * l, axis=2)
    acc = jnp.sum(w[..., None] * acc, axis=2)  # [B, KVH, Gp, Dh]
    seen = l_all > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l_all, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m_all + jnp.log(jnp.where(seen, l_all, 1.0)), MASK_VALUE)
    return out[:, :, :G].reshape(B, H, Dh), lse[:, :, :G].reshape(B, H)


def merge_new_key(out: jax.Array, lse: jax.Array, q: jax.Array, k_new: jax.Array, v_new: jax.Array, *,
                  scale: float, softcap: float | None = None) -> jax.Array:
    """Attention over the cache keys (out [B, H, Dh], lse [B, H] from `paged_decode_attention`) plus one more key,
    k_new/v_new [B, KVH, Dh] (the current token's own, not yet written), exactly: both parts reweighed by their
    share of the joint softmax. -> [B, H, Dh] float32."""
    B, H, Dh = q.shape
    KVH = k_new.shape[1]
    qg = q.astype(jnp.float32).reshape(B, KVH, H // KVH, Dh)
    s = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
    s = _softcap(s, softcap).reshape(B, H)
    m = jnp.maximum(lse, s)
    w_old, w_new = jnp.exp(lse - m), jnp.exp(s - m)  # [B, H]
    v = jnp.repeat(v_new.astype(jnp.float32), H // KVH, axis=1)  # [B, H, Dh]
    return (out * w_old[..., None] + v * w_new[..., None]) / (w_old + w_new)[..., None]


def _chunk_kernel(layer_ref, table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, scale, softcap, window,
                  pages_per_block, table_pages, precision):
    """Program (row b, kv head h, query block): flash attention of the block's queries (rows = queries x the
    group's heads) over the pages from the block's first visible key to its last query's position."""
    h = pl.program_id(1)
    PS = k_ref.shape[3]
    n = pages_per_block
    layer = layer_ref[0]
    pos = pos_ref[...]  # [R] each row's query position, -1 for padding
    hi = jnp.minimum(jnp.max(pos) // PS + 1, table_pages)  # past the last query's page: causal future, skipped
    lo = 0 if window is None else jnp.maximum(jnp.min(jnp.where(pos >= 0, pos, 2**30)) - window + 1, 0) // PS
    q = q_ref[...]  # [R, Dh]

    def body(i, carry):
        page = lo + i * n
        k, v = _keys_block(k_ref, v_ref, table_ref, layer, h, page, n)
        key_pos = page * PS + lax.broadcasted_iota(jnp.int32, (1, n * PS), 1)  # [1, K]
        visible = key_pos <= pos[:, None]  # [R, K]; padding rows (-1) see nothing
        if window is not None:
            visible &= key_pos > pos[:, None] - window
        return _online_softmax_step(carry, q, k, v, visible, scale, softcap, precision)

    R, Dh = q.shape
    init = (jnp.full((R,), MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R, Dh), jnp.float32))
    _, l, acc = lax.fori_loop(0, (jnp.maximum(hi - lo, 0) + n - 1) // n, body, init)
    seen = l > 0
    o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sliding_window", "block_q", "pages_per_block",
                                             "interpret"))
def paged_chunk_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: Any, pages: jax.Array,
                          q_positions: jax.Array, *, scale: float, softcap: float | None = None,
                          sliding_window: int | None = None, block_q: int | None = None,
                          pages_per_block: int | None = None,
                          interpret: bool | None = None) -> jax.Array:
    """A chunk of queries over the row's pages, causal by position: key j is visible to a query at position p iff
    j <= p (and j > p - sliding_window with a window). q [B, T, H, Dh] (rotated, not scaled); q_positions [B, T]
    (-1: padding). -> [B, T, H, Dh] float32 (padding queries: 0). Its keys must already be in the cache.
    ``block_q`` queries per program (default: 64 query-head rows); ``pages_per_block`` and ``interpret`` as in
    `paged_decode_attention`.
    """
    interpret = _interpret(interpret)
    B, T, H, Dh = q.shape
    _, _, KVH, PS, _ = cache_k.shape
    G = H // KVH
    Gp = _pow2(G)
    n = pages_per_block or _default_pages_per_block(PS)
    BT = block_q or max(1, 64 // Gp)
    BT = max(min(BT, _pow2(T)), _pow2(max(1, 16 // Gp)))  # rows = BT * Gp >= 16, a power of two
    Tp = -(-T // BT) * BT
    positions = jnp.pad(jnp.asarray(q_positions, jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
    qg = jnp.pad(q.reshape(B, T, KVH, G, Dh).astype(cache_k.dtype), ((0, 0), (0, Tp - T), (0, 0), (0, Gp - G), (0, 0)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(B, KVH, Tp * Gp, Dh)  # rows ordered (query, head of the group)
    row_pos = jnp.broadcast_to(positions[:, :, None], (B, Tp, Gp)).reshape(B, Tp * Gp)
    table = _padded_table(pages, n)
    R = BT * Gp
    whole = pl.BlockSpec()
    kernel = functools.partial(_chunk_kernel, scale=scale, softcap=softcap, window=sliding_window,
                               pages_per_block=n, table_pages=block_table(pages).shape[1],
                               precision=_precision(cache_k.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(B, KVH, Tp // BT),
        in_specs=[whole,
                  pl.BlockSpec((None, table.shape[1]), lambda b, h, t: (b, 0)),
                  pl.BlockSpec((None, R), lambda b, h, t: (b, t)),
                  pl.BlockSpec((None, None, R, Dh), lambda b, h, t: (b, h, t, 0)),
                  whole, whole],
        out_specs=pl.BlockSpec((None, None, R, Dh), lambda b, h, t: (b, h, t, 0)),
        out_shape=jax.ShapeDtypeStruct((B, KVH, Tp * Gp, Dh), jnp.float32),
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="paged_chunk_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), table, row_pos, qg, cache_k, cache_v)
    out = out.reshape(B, KVH, Tp, Gp, Dh)[:, :, :T, :G]
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


def _reference(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, scale: float,
               softcap: float | None) -> tuple[jax.Array, jax.Array]:
    """Masked softmax attention in float32. q [B, T, H, Dh]; keys/values [B, KVH, S, Dh]; mask [B, T, S] ->
    (out [B, T, H, Dh], 0 where nothing is visible; lse [B, T, H], MASK_VALUE there)."""
    B, T, H, Dh = q.shape
    KVH = keys.shape[1]
    qg = q.astype(jnp.float32).reshape(B, T, KVH, H // KVH, Dh)
    hp = lax.Precision.HIGHEST
    s = jnp.einsum("btkgd,bksd->btkgs", qg, keys.astype(jnp.float32), precision=hp) * scale
    visible = mask[:, :, None, None, :]
    s = jnp.where(visible, _softcap(s, softcap), MASK_VALUE)
    m = jnp.max(s, axis=-1)
    p = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)  # [B, T, KVH, G]
    out = jnp.einsum("btkgs,bksd->btkgd", p, values.astype(jnp.float32), precision=hp)
    seen = l > 0
    out = jnp.where(seen[..., None], out / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)
    return out.reshape(B, T, H, Dh), lse.reshape(B, T, H)


def _gathered(cache_k: jax.Array, cache_v: jax.Array, layer: Any, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every position of the rows' tables, [B, KVH, P * page_size, Dh], copied out of the pages."""
    table = block_table(pages)
    S = table.shape[1] * cache_k.shape[3]
    return gather_pages(cache_k, layer, table, S), gather_pages(cache_v, layer, table, S)


def paged_decode_attention_reference(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: Any,
                                     pages: jax.Array, starts: jax.Array, lengths: jax.Array, *, scale: float,
                                     softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """`paged_decode_attention` in XLA ops: the pages gathered, then a masked softmax."""
    keys, values = _gathered(cache_k, cache_v, layer, pages)
    j = jnp.arange(keys.shape[2], dtype=jnp.int32)
    mask = (j >= starts[:, None]) & (j < lengths[:, None])  # [B, S]
    out, lse = _reference(q[:, None], keys, values, mask[:, None], scale, softcap)
    return out[:, 0], lse[:, 0]


def paged_chunk_attention_reference(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: Any,
                                    pages: jax.Array, q_positions: jax.Array, *, scale: float,
                                    softcap: float | None = None, sliding_window: int | None = None) -> jax.Array:
    """`paged_chunk_attention` in XLA ops: the pages gathered, then a causal (windowed) masked softmax."""
    keys, values = _gathered(cache_k, cache_v, layer, pages)
    j = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, None, :]
    p = q_positions[:, :, None]
    mask = j <= p
    if sliding_window is not None:
        mask &= j > p - sliding_window
    return _reference(q, keys, values, mask, scale, softcap)[0]
