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
    one_row = np.asarray(jax.jit(block_matmul, static_argnums=2)(jnp.asarray(x[:1, :1]), w, 2048))  # decode at batch 1
    np.testing.assert_allclose(one_row, expected[:1, :1], rtol=1e-5, atol=1e-4 * np.abs(expected).max())
    tokens = jnp.array([[0, 5, OUT - 1]])
    np.testing.assert_array_equal(np.asarray(embed_lookup(w, tokens, jnp.float32)), expected_w[[[0, 5, OUT - 1]]])


def test_other_formats_and_sources_are_refused_by_name(tmp_path):
    from maxjax.models import load_model
    from maxjax.runtime.config import RuntimeConfig

    with pytest.raises(ValueError, match="Q6_K"):
        blocks_from_raw(np.zeros((4, 210), np.uint8), Q.Q6_K, 4, 256)
    (tmp_path / "config.json").write_text("{}")  # an HF folder: nothing to keep quantized
    with pytest.raises(ValueError, match="quantize='gguf'"):
        load_model(tmp_path, quantize="gguf")
    with pytest.raises(ValueError, match="quantize"):
        RuntimeConfig(quantize="q4")


# ---- a tiny Llama GGUF with every kept format, through load_model and the serving runtime ------------------

TINY = dict(vocab=256, hidden=256, ffn=512, heads=4, kv_heads=2, layers=2)
# GGUF name pattern -> type per layer; ffn_down mixes types across layers, so it is dequantized to float.
TYPES = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_K, "blk.{i}.attn_q.weight": Q.Q4_0,
         "blk.{i}.attn_k.weight": Q.Q4_0, "blk.{i}.attn_v.weight": Q.Q4_0, "blk.{i}.attn_output.weight": Q.Q4_K,
         "blk.{i}.ffn_gate.weight": Q.Q4_1, "blk.{i}.ffn_up.weight": Q.Q4_1,
         "blk.{i}.ffn_down.weight": (Q.Q8_0, Q.F16)}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    t, rng = TINY, np.random.default_rng(0)
    head_dim = t["hidden"] // t["heads"]
    shapes = {"token_embd.weight": (t["vocab"], t["hidden"]), "output.weight": (t["vocab"], t["hidden"]),
              "blk.{i}.attn_q.weight": (t["hidden"], t["hidden"]),
              "blk.{i}.attn_k.weight": (t["kv_heads"] * head_dim, t["hidden"]),
              "blk.{i}.attn_v.weight": (t["kv_heads"] * head_dim, t["hidden"]),
              "blk.{i}.attn_output.weight": (t["hidden"], t["hidden"]),
              "blk.{i}.ffn_gate.weight": (t["ffn"], t["hidden"]), "blk.{i}.ffn_up.weight": (t["ffn"], t["hidden"]),
              "blk.{i}.ffn_down.weight": (t["hidden"], t["ffn"])}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": t["layers"], "context_length": 256, "embedding_length": t["hidden"],
                       "feed_forward_length": t["ffn"], "attention.head_count": t["heads"],
                       "attention.head_count_kv": t["kv_heads"], "vocab_size": t["vocab"]}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    for pattern, (rows, cols) in shapes.items():
        for i in range(t["layers"] if "{i}" in pattern else 1):
            types = TYPES[pattern]
            qtype = types[i] if isinstance(types, tuple) else types
            if qtype == Q.F16:
                writer.add_tensor(pattern.format(i=i), (0.05 * rng.normal(size=(rows, cols))).astype(np.float16))
            else:
                writer.add_tensor(pattern.format(i=i), raw_tensor(qtype, rng, rows, cols), raw_dtype=qtype)
    for i in range(t["layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.normal(size=t["hidden"])).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(t["hidden"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_quantized_gguf_model_equals_the_float_forward_of_its_dequantized_weights(tiny_gguf):
    from maxjax.models import load_model
    from maxjax.weights.gguf_file import open_gguf

    dense = load_model(tiny_gguf, tokenizer=False)
    kept = load_model(tiny_gguf, tokenizer=False, quantize="gguf")
    layers = kept.params["layers"]
    assert layers["wq"]["q"].dtype == jnp.uint8 and "min" not in layers["wq"]  # Q4_0
    assert layers["w_up"]["q"].dtype == jnp.uint8 and "min" in layers["w_up"]  # Q4_1
    assert "sub_scale" in layers["wo"] and "sub_scale" in kept.params["lm_head"]  # Q4_K
    assert kept.params["embed"]["q"].dtype == jnp.int8  # Q8_0
    assert layers["w_down"].dtype == jnp.float32  # Q8_0 in one layer, F16 in the other: dequantized
    file_bytes = sum(t.n_bytes for t in open_gguf(tiny_gguf).tensors if "ffn_down" not in t.name)
    ours = leaf_bytes({k: v for k, v in kept.params.items() if k != "layers"}) + leaf_bytes(
        {k: v for k, v in layers.items() if k != "w_down"})
    assert ours <= 1.3 * file_bytes, (ours, file_bytes)

    ids = np.random.default_rng(1).integers(0, TINY["vocab"], (2, 20))
    want = dense.logits(ids)
    got = kept.logits(ids)
    print(f"max abs logit diff, kept blocks vs dequantized float: {np.abs(got - want).max():.2e} "
          f"(logits up to {np.abs(want).max():.2f})")
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max(), rtol=0)


def test_serving_runtime_on_kept_blocks_matches_float_and_never_recompiles(tiny_gguf):
    from maxjax.architectures import llama
    from maxjax.architectures.block_panels import Q4_TARGET, is_block_panels
    from maxjax.context import TextContext
    from maxjax.interfaces import SamplingParams, TextGenerationInputs
    from maxjax.pipelines.text import TextGenerationPipeline
    from maxjax.runtime.compile_cache import compile_count
    from maxjax.runtime.config import RuntimeConfig
    from maxjax.kernels import native
    from maxjax.runtime.engine import Engine
    from maxjax.models import load_model

    runtime = dict(max_batch_size=2, max_seq_len=32, max_num_steps=4, length_buckets=(32,), max_prefill_len=32,
                   batch_buckets=(2,), scan_decode_layers=True)  # one prefill and one decode program
    outputs = {}
    for quantize in (None, "gguf"):
        model = load_model(tiny_gguf, tokenizer=False, quantize=quantize)
        pipe = TextGenerationPipeline(Engine(llama, model.config, model.params,
                                             RuntimeConfig(quantize=quantize, **runtime)))
        if quantize and native.ffi_target(Q4_TARGET):  # on the CPU the fused Q4_0 / Q4_1 weights run the native kernel
            layer = pipe.engine.params["layers"][0]
            assert is_block_panels(layer["wqkv"]) and is_block_panels(layer["w_gate_up"])
        pipe.warmup()
        before = compile_count()
        rng = np.random.default_rng(2)
        live = {f"r{i}": TextContext(f"r{i}", rng.integers(0, TINY["vocab"], n).astype(np.int32), max_length=n + 10,
                                     sampling_params=SamplingParams(top_k=1)) for i, n in enumerate((5, 13))}
        tokens = {rid: [] for rid in live}
        while live:
            for rid, out in pipe.next_token(TextGenerationInputs(dict(live), num_steps=4)).items():
                tokens[rid] += out.tokens
                if out.is_done:
                    pipe.release(rid)
                    del live[rid]
        assert compile_count() == before, "the warmed runtime compiled again"
        outputs[quantize] = tokens
    assert outputs["gguf"] == outputs[None] and all(len(t) == 10 for t in outputs[None].values())


@pytest.mark.slow
def test_smollm2_kept_quantized_equals_its_dequantized_float_forward(smollm2_gguf):
    """The real Q4_1 file (its embedding Q8_0): logits of the kept blocks vs the float forward of the same
    file dequantized by the gguf package, by XLA's block products and (on the CPU) through the serving layout's
    native kernel (every layer weight and the tied output projection repacked); device bytes vs the file's."""
    import dataclasses

    from maxjax.architectures import block_panels, llama
    from maxjax.models import load_model
    from maxjax.weights.gguf_file import open_gguf

    kept = load_model(smollm2_gguf, quantize="gguf")
    dense = load_model(smollm2_gguf, tokenizer=False)
    file_bytes = sum(int(t.n_bytes) for t in open_gguf(smollm2_gguf).tensors)
    ours, dense_bytes = leaf_bytes(kept.params), leaf_bytes(dense.params)
    print(f"device params: kept {ours / 1e6:.1f} MB, float32 {dense_bytes / 1e6:.1f} MB, file tensors "
          f"{file_bytes / 1e6:.1f} MB")
    assert ours <= 1.3 * file_bytes
    ids = [kept.tokenizer.encode_text("The three primary colors are")]
    got, want = kept.logits(ids), dense.logits(ids)
    print(f"max abs logit diff: {np.abs(got - want).max():.2e} (logits up to {np.abs(want).max():.1f})")
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()

    runtime = llama.runtime_params(kept.params)
    if block_panels.native.ffi_target(block_panels.Q4_TARGET) is None:
        return  # no C++ compiler: tests/test_block_panels.py says so
    packed = [block_panels.is_block_panels(w) for layer in runtime["layers"] for w in layer.values() if isinstance(w, dict)]
    assert len(packed) == 4 * kept.config.num_layers and all(packed) and block_panels.is_block_panels(runtime["lm_head"])
    native = dataclasses.replace(kept, params=runtime).logits(ids)
    print(f"max abs logit diff, native kernel: {np.abs(native - want).max():.2e}")
    np.testing.assert_allclose(native, want, atol=2e-4, rtol=0)
    assert (native.argmax(-1) == want.argmax(-1)).all()
