"""GGUF quantized blocks kept quantized: each kept format stays int8/packed 4-bit on the device, its matmul
equals the dot with the gguf package's own dequantization, and its bytes stay within 1.3x of the file's."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.architectures.quantized import block_matmul, dequantize_blocks, embed_lookup
from maxjax.weights.gguf_blocks import block_shape, blocks_from_raw

Q = gguf.GGMLQuantizationType
OUT, IN = 48, 512


def raw_tensor(tensor_type, rng, out_features=OUT, in_features=IN) -> np.ndarray:
    """Raw GGUF bytes [O, bytes per row] of a random tensor (Q4_K, which gguf cannot quantize, from random
    fields: float16 d and dmin, random 6-bit scale bytes and nibbles)."""
    if tensor_type != Q.Q4_K:
        w = rng.normal(size=(out_features, in_features)).astype(np.float32) * rng.uniform(0.1, 2, (out_features, 1))
        return gguf.quants.quantize(w, tensor_type)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    blocks = rng.integers(0, 256, size=(out_features, in_features // block_size, block_bytes), dtype=np.uint8)
    blocks[..., 0:2] = rng.uniform(0.001, 0.01, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    blocks[..., 2:4] = rng.uniform(0.001, 0.01, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(out_features, -1)


def leaf_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("tensor_type", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda t: t.name)
def test_blocks_stay_quantized_and_their_matmul_equals_the_dequantized_dot(tensor_type):
    rng = np.random.default_rng(int(tensor_type))
    raw = raw_tensor(tensor_type, rng)
    expected_w = gguf.quants.dequantize(raw, tensor_type).reshape(OUT, IN)  # the gguf package's float values
    w = jax.device_put(blocks_from_raw(raw, tensor_type, OUT, IN))
    assert block_shape(w) == (OUT, IN)
    value_dtype = jnp.int8 if tensor_type == Q.Q8_0 else jnp.uint8
    assert w["q"].dtype == value_dtype and w["scale"].dtype == jnp.float16
    assert leaf_bytes(w) <= 1.3 * raw.nbytes, (leaf_bytes(w), raw.nbytes)
    np.testing.assert_array_equal(np.asarray(dequantize_blocks(w)), expected_w)  # bit-exact dequantization

    x = rng.normal(size=(3, 2, IN)).astype(np.float32)
    expected = x.astype(np.float64) @ expected_w.astype(np.float64).T
    for chunk_elements in (1 << 30, 2048):  # one dot (as on accelerators) and the chunked CPU loop (12 chunks)
        got = np.asarray(jax.jit(block_matmul, static_argnums=2)(jnp.asarray(x), w, chunk_elements))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())
    tokens = jnp.array([[0, 5, OUT - 1]])
    np.testing.assert_array_equal(np.asarray(embed_lookup(w, tokens, jnp.float32)), expected_w[[[0, 5, OUT - 1]]])


def test_other_formats_are_refused_by_name():
    with pytest.raises(ValueError, match="Q6_K"):
        blocks_from_raw(np.zeros((4, 210), np.uint8), Q.Q6_K, 4, 256)
