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

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures.block_panels import block_panel_matmul, is_block_panels
from maxjax.architectures.panels import is_panels, panel_matmul

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


# ---------------------------------------------------------------------------------------------- GGUF blocks
# A weight kept in a GGUF file's own block quantization (``maxjax.weights.gguf_blocks`` reads them), out-major
# [O, D] with blocks along D, every component's leading axis O (stacked layers add an axis before it):
#   "q":         int8 [O, D] (Q8_0), or uint8 [O, D / (2 g), g] of packed nibbles: byte j of a group of 2g
#                values holds value j (low nibble) and value j + g (high nibble) (g = 16: Q4_0/Q4_1, 32: Q4_K)
#   "scale":     float16 [O, B], one per block (B = D / block size: 32 for Q8_0/Q4_x, 256 for Q4_K)
#   "min":       float16 [O, B] (Q4_1: added; Q4_K: its dmin, subtracted), absent for Q8_0/Q4_0
#   "sub_scale", "sub_min": uint8 [O, D / 32] (Q4_K: 6-bit multipliers of scale and min per 32 values)
# Value = q * scale + min (Q4_0: (q - 8) * scale; Q4_K: q * (scale * sub_scale) - min * sub_min), computed in
# float32 exactly as the gguf package dequantizes, so the kept weights equal the file's dequantized ones.


def is_blocks(w: Any) -> bool:
    return isinstance(w, dict) and "q" in w


def _nibbles(q: jax.Array) -> jax.Array:
    """Packed bytes uint8 [..., G, g] -> their 4-bit values uint8 [..., G, 2, g] (low nibbles, then high).
    A broadcast shift rather than a concatenation: XLA CPU vectorizes it as one elementwise loop."""
    shifts = jnp.array([0, 4], jnp.uint8)[:, None]  # [2, 1]
    return (q[..., None, :] >> shifts) & 0x0F


def _scale_and_offset(w: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """float32 scale and additive offset per block of values ([..., O, B]; K-quants: per 32-value sub-block),
    None when the format has no offset (Q8_0; Q4_0's -8 is left to the caller)."""
    scale = w["scale"].astype(jnp.float32)  # [..., O, B]
    offset = w["min"].astype(jnp.float32) if "min" in w else None
    if "sub_scale" in w:  # K-quant: two-level scales over 32-value sub-blocks
        per_block = w["sub_scale"].shape[-1] // scale.shape[-1]
        sub = lambda top, ints: (top[..., None] * ints.reshape(*top.shape, per_block).astype(jnp.float32)  # noqa: E731
                                 ).reshape(ints.shape)
        scale, offset = sub(scale, w["sub_scale"]), -sub(offset, w["sub_min"])  # [..., O, D / 32]
    return scale, offset


def dequantize_blocks(w: dict[str, jax.Array], dtype=jnp.float32) -> jax.Array:
    """The float weight [..., O, D] of a GGUF block weight."""
    q = w["q"]
    if q.dtype == jnp.int8:
        values = q.astype(jnp.float32)  # [..., O, D]
    else:
        values = _nibbles(q).reshape(*q.shape[:-2], -1).astype(jnp.float32)  # [..., O, D]
        if "min" not in w:
            values = values - 8.0  # Q4_0: symmetric around 8
    scale, offset = _scale_and_offset(w)  # [..., O, D / block]
    blocks = values.reshape(*scale.shape, -1)  # [..., O, B, block]
    blocks = blocks * scale[..., None] + (0.0 if offset is None else offset[..., None])
    return blocks.reshape(values.shape).astype(dtype)


def _nibble_half_products(x_halves: tuple[jax.Array, jax.Array], w: dict[str, jax.Array]) -> jax.Array:
    """x @ W [N, O] for a 4-bit block weight as two dots: the low nibbles of every byte (the first g values of
    each group of 2g) against their x values, plus the high nibbles against theirs.

    Each half dequantizes as a plain elementwise loop (mask or shift, convert, scale, offset), like an int8
    chunk: XLA CPU runs it ~3.5x faster than unpacking into the interleaved [D] order, which needs the
    nibbles broadcast into one array; the dots then run as fast as float32 ones.
    ``x_halves``: x's values at the low and the high nibbles' positions, [N, D / 2] each.
    """
    q = w["q"]  # [O, G, g]
    scale, offset = _scale_and_offset(w)  # [O, D / block]
    if offset is None:
        offset = -8.0 * scale  # Q4_0: values centre on 8
    scale, offset = (a.reshape(*q.shape[:2], -1) for a in (scale, offset))  # [O, G, blocks per group: 1 or 2]
    out = 0.0
    for half, (nibbles, x_half) in enumerate(zip((q & 0x0F, q >> 4), x_halves)):
        k = min(half, scale.shape[-1] - 1)  # Q4_0/Q4_1: one block per group; Q4_K: a sub-block per half
        values = nibbles.astype(jnp.float32) * scale[..., k, None] + offset[..., k, None]  # [O, G, g]
        out = out + jnp.einsum("nd,od->no", x_half, values.reshape(q.shape[0], -1).astype(x_half.dtype))
    return out


def block_matmul(x: jax.Array, w: dict[str, jax.Array], chunk_elements: int = CHUNK_ELEMENTS) -> jax.Array:
    """x [..., D] @ W -> [..., O] for a GGUF block weight, dequantized inside the program.

    On the CPU the output channels run in chunks (a loop over [C, O/C, ...] views of every component), for the
    same reason as ``int8_matmul``: the dequantized chunk stays in cache, main memory is read packed; 4-bit
    chunks as two half-dots (``_nibble_half_products``). On GPU/TPU one dequantize + dot, which XLA may fuse.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [N, D]
    out_features = w["q"].shape[0]
    chunks = num_chunks(out_features, x.shape[-1], chunk_elements) if jax.default_backend() == "cpu" else 1
    if chunks == 1:
        out = jnp.einsum("nd,od->no", x2, dequantize_blocks(w, x.dtype))  # [N, O]
    else:
        parts_in = {k: v.reshape(chunks, out_features // chunks, *v.shape[1:]) for k, v in w.items()}
        if w["q"].dtype == jnp.uint8:  # 4-bit: x split as the nibbles are, once for every chunk
            x_groups = x2.reshape(x2.shape[0], w["q"].shape[1], 2, -1)  # [N, G, 2, g]
            x_halves = tuple(x_groups[:, :, h].reshape(x2.shape[0], -1) for h in (0, 1))  # [N, D / 2] x2
            product = functools.partial(_nibble_half_products, x_halves)
        else:
            product = lambda wc: jnp.einsum("nd,od->no", x2, dequantize_blocks(wc, x.dtype))  # noqa: E731

        def chunk(_, wc):  # every component [O/C, ...]
            return None, product(wc)  # [N, O/C]

        _, parts = jax.lax.scan(chunk, None, parts_in)  # [C, N, O/C]
        out = jnp.moveaxis(parts, 0, 1).reshape(x2.shape[0], -1)  # [N, O]
    return out.reshape(*lead, -1)


def concat_outputs(weights: list[Any], cat) -> Any:
    """Weights [D, O_i] (float) or GGUF block weights concatenated along their outputs (fused projections);
    None when they cannot be (different block formats, or int8 weights, which are fused before quantizing)."""
    if all(not isinstance(w, dict) for w in weights):
        return cat(weights, axis=-1)
    if not all(is_blocks(w) for w in weights):
        return None
    first = weights[0]
    if any(set(w) != set(first) or any(w[k].dtype != first[k].dtype or w[k].shape[-1] != first[k].shape[-1]
                                        for k in w) for w in weights):
        return None
    trailing = {k: 2 if k == "q" and first[k].dtype == jnp.uint8 else 1 for k in first}  # axes after O
    return {k: cat([w[k] for w in weights], axis=-1 - trailing[k]) for k in first}


def linear(x: jax.Array, w: Any) -> jax.Array:
    """x @ w for a float [D, O] weight, an int8 one, a GGUF block one or a panel-packed one (``panels``,
    ``block_panels``)."""
    if is_panels(w):
        return panel_matmul(x, w)
    if is_block_panels(w):
        return block_panel_matmul(x, w)
    if is_blocks(w):
        return block_matmul(x, w)
    return int8_matmul(x, w) if is_quantized(w) else x @ w


def embed_lookup(embed: Any, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding (float [V, D] or quantized, its V the output channels) for int tokens."""
    if is_blocks(embed):
        return dequantize_blocks({k: v[tokens] for k, v in embed.items()}, dtype)  # [..., D]
    if not is_quantized(embed):
        return embed[tokens]
    q = embed["int8"]
    flat = q.reshape(-1, q.shape[-1])  # [V, D]
    return flat[tokens].astype(dtype) * embed["scale"][tokens][..., None].astype(dtype)


def embed_matmul(x: jax.Array, embed: Any) -> jax.Array:
    """x [..., D] against every embedding row: [..., V] (the tied output projection)."""
    if is_quantized(embed) or is_blocks(embed):
        return linear(x, embed)
    return jnp.einsum("...d,vd->...v", x, embed)
