"""Batched LoRA math: every row of a batch adds the low-rank update of its own adapter (S-LoRA / Punica).

The adapters of one projection live in stacked, rank-padded arrays with a leading slot axis S, so rows with
different adapters (and rows without one: slot 0 holds zeros) share one batch and one compiled program:

    {"a": [S, in, k*R], "b": (k arrays [S, R, out_i])}

``k`` is 1 for a plain projection and the number of pieces of a fused one (Q|K|V: 3, gate|up: 2). The pieces
share the input, so their A matrices sit side by side along the rank axis (one shrink matmul); each piece has
its own B, and the expanded pieces are concatenated in the fused weight's column order. Rank padding is zeros,
which add nothing. B carries the adapter's scale (``maxjax.weights.lora``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_matmul(x: jax.Array, w: jax.Array, index: jax.Array) -> jax.Array:
    """Per row b: x[b] [T, i] @ w[index[b]] [i, o] -> [B, T, o] (the batched gather-matmul, BGMV)."""
    return jnp.einsum("bti,bio->bto", x, w[index].astype(x.dtype))


def lora_delta(x: jax.Array, lora: dict, index: jax.Array) -> jax.Array:
    """The LoRA update of one (possibly fused) projection: x [B, T, in] -> [B, T, sum(out_i)], row b with
    adapter slot index[b]."""
    shrunk = gather_matmul(x, lora["a"], index)  # [B, T, k*R]
    pieces = jnp.split(shrunk, len(lora["b"]), axis=-1)  # k x [B, T, R]
    return jnp.concatenate([gather_matmul(p, b, index) for p, b in zip(pieces, lora["b"])], axis=-1)
