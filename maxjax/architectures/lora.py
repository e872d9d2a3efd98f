"""Batched LoRA math: every row of a batch adds the low-rank update of its own adapter (S-LoRA / Punica).

The adapters of one projection live in stacked, rank-padded arrays with a slot axis S, so rows with different
adapters (and rows without one: slot 0 holds zeros) share one batch and one compiled program:

    {"a": [in, S, k*R], "b": (k arrays [S, R, out_i])}

``k`` is 1 for a plain projection and the number of pieces of a fused one (Q|K|V: 3, gate|up: 2). The pieces
share the input, so their A matrices sit side by side along the rank axis (one shrink matmul); each piece has
its own B, and the expanded pieces are concatenated in the fused weight's column order. Rank padding is zeros,
which add nothing. B carries the adapter's scale (``maxjax.weights.lora``).

Each row picks its slot with a one-hot mask between two dense matmuls over all slots (shrink x @ A for every
slot, zero the other slots' ranks, expand with every slot's B), instead of gathering each row's A and B:
measured on XLA CPU over SmolLM2's 30 layers of projections at batch 8 (rank 16, S = 5), per-row gathered
matmuls (BGMV) took 5-7x the time of the projections alone, the masked dense form was within noise of them.
Its cost grows with S, not with the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_delta(x: jax.Array, lora: dict, index: jax.Array) -> jax.Array:
    """The LoRA update of one (possibly fused) projection: x [B, T, in] -> [B, T, sum(out_i)], row b with
    adapter slot index[b]."""
    a, bs = lora["a"], lora["b"]
    d_in, num_slots, k_rank = a.shape
    lead = x.shape[:-1]
    shrunk = (x @ a.reshape(d_in, num_slots * k_rank).astype(x.dtype)).reshape(*lead, num_slots, k_rank)
    own_slot = jax.nn.one_hot(index, num_slots, dtype=x.dtype)  # [B, S]
    shrunk = shrunk * own_slot.reshape(own_slot.shape[:1] + (1,) * (len(lead) - 1) + own_slot.shape[1:] + (1,))
    pieces = jnp.split(shrunk, len(bs), axis=-1)  # k x [B, T, S, R]
    return jnp.concatenate([p.reshape(*lead, -1) @ b.reshape(-1, b.shape[-1]).astype(x.dtype)  # [B, T, out_i]
                            for p, b in zip(pieces, bs)], axis=-1)
