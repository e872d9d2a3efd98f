"""GGUF quantized tensors kept quantized: the raw blocks of a file -> the block weights of
``maxjax.architectures.quantized`` (int8 / packed 4-bit values with their float16 scales).

Kept: Q8_0, Q4_0, Q4_1 and Q4_K, the formats of most published 8- and 4-bit files (Q4_K_M is mostly Q4_K).
The bytes are split into value and scale arrays without re-quantizing, so the weights on the device are the
file's own, within a few percent of its size. Other formats (Q5_x, Q2_K, Q3_K, Q6_K) are dequantized to float.
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
KEPT_TYPES = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K})


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields [..., 2] (uint8) -> float16 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def blocks_from_raw(raw: np.ndarray, tensor_type: Q, out_features: int, in_features: int) -> dict[str, np.ndarray]:
    """A tensor's raw bytes (uint8 [O, bytes per row], GGUF's row-major [out, in] layout) -> block weight."""
    if tensor_type not in KEPT_TYPES:
        raise ValueError(f"GGML type {tensor_type.name} is not kept quantized (kept: "
                         f"{', '.join(sorted(t.name for t in KEPT_TYPES))})")
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    if in_features % block_size:
        raise ValueError(f"{tensor_type.name} rows of {in_features} values are not whole blocks of {block_size}")
    num_blocks = in_features // block_size
    blocks = np.asarray(raw, np.uint8).reshape(out_features, num_blocks, block_bytes)  # [O, B, bytes]
    if tensor_type == Q.Q8_0:
        return {"q": np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(out_features, in_features),
                "scale": _f16(blocks[..., 0:2])}
    if tensor_type == Q.Q4_0:
        return {"q": np.ascontiguousarray(blocks[..., 2:]), "scale": _f16(blocks[..., 0:2])}  # q [O, B, 16]
    if tensor_type == Q.Q4_1:
        return {"q": np.ascontiguousarray(blocks[..., 4:]), "scale": _f16(blocks[..., 0:2]),
                "min": _f16(blocks[..., 2:4])}
    # Q4_K: d, dmin, 12 bytes of 6-bit sub-block scales and mins, then 4 groups of 32 packed bytes.
    scales = blocks[..., 4:16].reshape(-1, 12)
    sub_scale, sub_min = gguf.quants.Q4_K.get_scale_min(scales)  # [O * B, 8] each
    return {"q": np.ascontiguousarray(blocks[..., 16:]).reshape(out_features, num_blocks * 4, 32),
            "scale": _f16(blocks[..., 0:2]), "min": _f16(blocks[..., 2:4]),
            "sub_scale": sub_scale.astype(np.uint8).reshape(out_features, num_blocks * 8),
            "sub_min": sub_min.astype(np.uint8).reshape(out_features, num_blocks * 8)}


def read_blocks(tensor) -> dict[str, np.ndarray]:
    """A GGUF reader tensor of a kept type as a block weight (out-major [O, D], like the file)."""
    in_features = int(tensor.shape[0])
    out_features = int(np.prod(tensor.shape[1:]))
    return blocks_from_raw(tensor.data, tensor.tensor_type, out_features, in_features)


def block_shape(w: dict[str, np.ndarray]) -> tuple[int, int]:
    """The [O, D] shape of the float weight a block weight stands for."""
    q = w["q"]
    return (q.shape[0], q.shape[1]) if q.dtype == np.int8 else (q.shape[0], q.shape[1] * q.shape[2] * 2)
