"""The native kernel for GGUF Q4_0/Q4_1/Q8_0 blocks (``maxjax/kernels/native/block_matmul.cc``) against float64
numpy of the gguf package's dequantized weights, and the serving layout that packs kept blocks for it. The real
SmolLM2 Q4_1 file through that layout: tests/test_gguf_blocks.py."""

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import unavailable

from maxjax.architectures import block_panels, llama
from maxjax.architectures.quantized import dequantize_blocks
from maxjax.weights.gguf_blocks import blocks_from_raw

Q = gguf.GGMLQuantizationType
FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q8_0]


@pytest.fixture(scope="module")
def kernel():
    """The jitted kernel; skipped without a C++ compiler (a failure on CI, whose machines have one)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the native kernels are XLA:CPU custom calls (jax.ffi, platform cpu); GPU/TPU run XLA's ops")
    if block_panels.native.ffi_target(block_panels.Q4_TARGET) is None:
        unavailable("the native kernels could not be built (no C++ compiler?)")
    return jax.jit(block_panels.block_panel_matmul)


def random_blocks(tensor_type, out_features, in_features, seed) -> tuple[dict, np.ndarray]:
    """A block weight of random values quantized by the gguf package, and its dequantized float32 [O, D]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out_features, in_features)).astype(np.float32) * rng.uniform(0.1, 2, (out_features, 1))
    raw = gguf.quants.quantize(w, tensor_type)
    return (blocks_from_raw(raw, tensor_type, out_features, in_features),
            gguf.quants.dequantize(raw, tensor_type).reshape(out_features, in_features))


@pytest.mark.parametrize("tensor_type", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("out_features, in_features", [(64, 96), (96, 160), (32, 576)])  # 3, 5, 18 blocks
def test_block_kernel_matches_float64_of_the_dequantized_weight(kernel, tensor_type, out_features, in_features):
    blocks, dense = random_blocks(tensor_type, out_features, in_features, seed=out_features + in_features)
    packed = block_panels.pack(blocks)
    assert block_panels.packable(blocks) and packed["block_panels"].shape[:2] == (out_features // 32, in_features // 32)
    back = block_panels.unpack(packed, q4_0=tensor_type == Q.Q4_0)
    assert set(back) == set(blocks) and all(np.array_equal(back[k], blocks[k]) for k in blocks)
    rng = np.random.default_rng(1)
    for lead in [(1,), (2,), (3,), (8,), (9,), (17,), (2, 5)]:  # register blocks of 8 rows, their remainders
        x = rng.standard_normal((*lead, in_features)).astype(np.float32)
        out = np.asarray(kernel(x, packed))
        expected = x.astype(np.float64) @ dense.astype(np.float64).T
        assert out.shape == (*lead, out_features)
        np.testing.assert_allclose(out, expected, atol=2e-6 * np.abs(expected).max(), rtol=0)


def test_only_unstacked_q4_0_q4_1_q8_0_with_whole_panels_are_packed():
    q41, _ = random_blocks(Q.Q4_1, 64, 64, seed=0)
    assert block_panels.packable(q41)
    assert not block_panels.packable({k: v[:48] for k, v in q41.items()})  # 48 outputs: not whole panels
    assert not block_panels.packable({k: np.stack([v, v]) for k, v in q41.items()})  # stacked layers
    assert not block_panels.packable(dict(q41, sub_scale=np.zeros((64, 2), np.uint8)))  # Q4_K
    assert not block_panels.packable({"q": q41["q"], "scale": np.full_like(q41["scale"], 9000)})  # Q4_0: -8 s overflows
    assert not block_panels.packable(np.zeros((64, 64), np.float32))


CFG = llama.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=24, tie_word_embeddings=True)


def test_runtime_layout_runs_kept_blocks_on_the_native_kernel(kernel):
    """A tied Q8_0 embedding gets a packed output projection, Q4_0/Q4_1 layer weights are packed (fused
    projections included), the compiled program has no dot left for them, and the logits are the float
    forward's of the dequantized weights."""
    params = llama.init_params(CFG, jax.random.key(0))
    formats = {"wq": Q.Q4_0, "wk": Q.Q4_0, "wv": Q.Q4_0, "wo": Q.Q4_1, "w_gate": Q.Q4_1, "w_up": Q.Q4_1,
               "w_down": Q.Q4_0}
    blocks, dense = random_blocks(Q.Q8_0, CFG.vocab_size, CFG.hidden_size, seed=5)
    kept, floats = dict(params, embed=blocks), dict(params, embed=dense)
    kept_layers, float_layers = dict(params["layers"]), dict(params["layers"])
    for i, (name, tensor_type) in enumerate(formats.items()):
        stacked = [random_blocks(tensor_type, *np.asarray(params["layers"][name][0]).T.shape, seed=10 * i + layer)
                   for layer in range(CFG.num_layers)]  # block weights are out-major [O, D]
        kept_layers[name] = jax.tree.map(lambda *a: np.stack(a), *[b for b, _ in stacked])
        float_layers[name] = np.stack([d.T for _, d in stacked])  # [L, D, O]
    kept["layers"], floats["layers"] = kept_layers, float_layers

    runtime = llama.runtime_params(jax.device_put(kept))
    packed = {k for layer in runtime["layers"] for k, w in layer.items() if block_panels.is_block_panels(w)}
    assert packed == {"wqkv", "wo", "w_gate_up", "w_down"} and block_panels.is_block_panels(runtime["lm_head"])
    assert not block_panels.is_block_panels(runtime["embed"])  # lookups read the embedding's own blocks
    np.testing.assert_array_equal(np.asarray(dequantize_blocks(block_panels.unpack(runtime["lm_head"]))), dense)

    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 7)).astype(np.int32)
    positions = np.broadcast_to(np.arange(7, dtype=np.int32), tokens.shape)

    def logits(p):
        cache = llama.init_kv_cache(CFG, 2, 8)
        return llama.forward(p, CFG, tokens, positions, cache, jnp.arange(2, dtype=jnp.int32), kv_len=8)[0]

    got = np.asarray(jax.jit(logits)(runtime))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(jax.jit(logits)(jax.device_put(floats)))
    print(f"max abs logit diff, native blocks vs float: {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    hidden = jax.ShapeDtypeStruct((4, CFG.hidden_size), jnp.float32)
    text = jax.jit(functools.partial(llama.lm_head, cfg=CFG)).lower(runtime, hidden=hidden).compile().as_text()
    assert block_panels.Q8_TARGET in text and " dot(" not in text


def test_without_the_native_kernels_blocks_stay_for_xla(monkeypatch):
    monkeypatch.setenv(block_panels.native.ENABLE_ENV, "0")
    blocks, _ = random_blocks(Q.Q4_1, 64, 64, seed=0)
    params = {"embed": blocks, "layers": [{"w_up": blocks}], "final_norm": np.ones(64, np.float32)}
    assert block_panels.pack_block_weights(params, ("w_up",)) is params
