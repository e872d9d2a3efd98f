"""Int8 weight-only linear layers: per-output-channel scales, dequantized inside the matmul.

A quantized weight is a dict ``{"int8": q, "scale": s}`` with q int8 ``[C, O/C, D]`` (the output channels
split into C chunks, each chunk's rows contiguous) and s float32 ``[O]``; ``x @ W`` becomes
``(x @ q_chunk.T) * s`` chunk by chunk. Why chunks: XLA CPU does not fuse an int8->float convert into a dot,
so ``x @ q.astype(f32)`` materialises the whole converted matrix every step (4 bytes written and read back
per weight: ~10x slower than float32 on SmolLM2's output projection). Converting one 128 Ki-weight chunk at a time
inside a loop keeps the converted block in cache, so main memory is read at 1 byte per weight.
On GPU/TPU XLA fuses the convert into the dot, and the unchunked form is used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHUNK_ELEMENTS = 1 << 17  # int8 weights converted per loop step on CPU (measured best of 16K..4M on SmolLM2)


def is_quantized(w: Any) -> bool:
    return isinstance(w, dict) and "int8" in w


def num_chunks(out_features: int, in_features: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """The number of equal output-channel chunks (a divisor of out_features) closest to chunk_elements each."""
    target = max(1, round(out_features * in_features / chunk_elements))
    divisors = [c for c in range(1, out_features + 1) if out_features % c == 0]
    return min(divisors, key=lambda c: (abs(c - target), c))


def quantize_int8(w: np.ndarray, out_axis: int = -1, chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, np.ndarray]:
    """Symmetric per-output-channel int8 of a float weight [..., D, O] (out_axis=-1) or [..., O, D] (-2).

    Leading axes (stacked layers) are kept: q [..., C, O/C, D], scale [..., O].
    """
    w = np.asarray(w, np.float32)
    if out_axis == -1:
        w = np.swapaxes(w, -1, -2)  # [..., O, D]
    out_features, in_features = w.shape[-2:]
    absmax = np.max(np.abs(w), axis=-1)  # [..., O]
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int8)  # [..., O, D]
    c = num_chunks(out_features, in_features, chunk_elements)
    return {"int8": q.reshape(*q.shape[:-2], c, out_features // c, in_features), "scale": scale}


def dequantize(w: dict[str, jax.Array], dtype=jnp.float32) -> jax.Array:
    """The float weight [..., O, D] (out-major) of a quantized one."""
    q = w["int8"]
    q = q.reshape(*q.shape[:-3], q.shape[-3] * q.shape[-2], q.shape[-1])
    return q.astype(dtype) * w["scale"][..., None].astype(dtype)


def int8_matmul(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    """x [..., D] @ W -> [..., O] for a quantized W (accumulates in x's dtype, scales after the dot)."""
    q, scale = w["int8"], w["scale"]  # [C, O/C, D], [O]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [N, D]
    if jax.default_backend() != "cpu" or q.shape[0] == 1:
        out = jnp.einsum("nd,od->no", x2, q.reshape(-1, q.shape[-1]).astype(x.dtype))  # [N, O]
    else:
        def chunk(_, qc):  # qc [O/C, D]
            return None, jnp.einsum("nd,od->no", x2, qc.astype(x.dtype))  # [N, O/C]

        _, parts = jax.lax.scan(chunk, None, q)  # [C, N, O/C]
        out = jnp.moveaxis(parts, 0, 1).reshape(x2.shape[0], -1)  # [N, O]
    return (out * scale.astype(out.dtype)).reshape(*lead, -1)


def linear(x: jax.Array, w: Any) -> jax.Array:
    """x @ w for a float [D, O] weight or a quantized one."""
    return int8_matmul(x, w) if is_quantized(w) else x @ w


def embed_lookup(embed: Any, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding (float [V, D] or quantized, its V the output channels) for int tokens."""
    if not is_quantized(embed):
        return embed[tokens]
    q = embed["int8"]
    flat = q.reshape(-1, q.shape[-1])  # [V, D]
    return flat[tokens].astype(dtype) * embed["scale"][tokens][..., None].astype(dtype)


def embed_matmul(x: jax.Array, embed: Any) -> jax.Array:
    """x [..., D] against every embedding row: [..., V] (the tied output projection)."""
    if is_quantized(embed):
        return int8_matmul(x, embed)
    return jnp.einsum("...d,vd->...v", x, embed)
