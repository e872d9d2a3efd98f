"""Weight loading: GGUF dequantization and names, HF safetensors parity with transformers, store round trip, errors."""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from maxjax.models import load_model
from maxjax.weights import convert_to_store, load_weights
from maxjax.weights.gguf_file import dequantize, open_gguf

Q = gguf.GGMLQuantizationType


def _write_gguf(path, arch, tensors, meta=None):
    """tensors: name -> (float32 array in HF [out, in] layout, GGML type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype, tolerance", [(Q.F16, 1e-3), (Q.Q8_0, 0.02), (Q.Q4_0, 0.3)])
def test_gguf_quantized_tensors_dequantize(tmp_path, qtype, tolerance):
    rng = np.random.default_rng(0)
    original = rng.standard_normal((8, 64)).astype(np.float32)
    path = _write_gguf(tmp_path / "t.gguf", "llama", {"w": (original, qtype)})
    (tensor,) = open_gguf(path).tensors
    ours = dequantize(tensor, str(path))
    assert ours.shape == (8, 64) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype))
    assert np.abs(ours - original).max() < tolerance  # the quantization error is bounded, so the layout is right


# ---- tiny models saved by transformers -------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


def _tiny_hf(tmp_path, kind="llama", **overrides):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15)
    if kind == "llama":
        config = transformers.LlamaConfig(**{**common, "tie_word_embeddings": False,
                                             "rope_parameters": LLAMA3_ROPE, **overrides})
        model_cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False, **overrides)
        model_cls = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, **overrides)
        model_cls = transformers.Qwen2ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms and biases away from their trivial init, so a missed tensor shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    return model, folder


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_sharded_hf_safetensors_logits_match_transformers(tmp_path):
    """A checkpoint split over several safetensors files (model.safetensors.index.json) loads whole. The families'
    own parity (all ten, safetensors and GGUF): tests/test_families.py and tests/test_families_gguf.py."""
    model, folder = _tiny_hf(tmp_path, "llama")
    assert (folder / "model.safetensors.index.json").is_file()
    ids = np.random.default_rng(1).integers(0, 128, (2, 40))
    ours = load_model(folder, tokenizer=False)
    assert dict(ours.config.rope_scaling)["rope_type"] == "llama3" and not ours.config.tie_word_embeddings
    diff = np.abs(ours.logits(ids) - _hf_logits(model, ids)).max()
    print(f"max abs logit diff vs transformers: {diff:.2e} (logits up to {np.abs(_hf_logits(model, ids)).max():.1f})")
    assert diff < 1e-5, diff


def test_unequal_lengths_match_unpadded(tmp_path):
    model, folder = _tiny_hf(tmp_path, "llama")
    ours = load_model(folder, tokenizer=False)
    rows = [list(range(5, 30)), list(range(40, 47))]
    logits = ours.logits(rows)
    assert logits.shape == (2, 25, 128) and np.isnan(logits[1, 7:]).all()
    for b, row in enumerate(rows):
        np.testing.assert_allclose(logits[b, : len(row)], _hf_logits(model, [row])[0], atol=1e-4, rtol=0)


def test_store_round_trip_gives_identical_logits(tmp_path):
    _, folder = _tiny_hf(tmp_path, "mistral")
    store = convert_to_store(folder, "tiny", models_dir=tmp_path / "models", with_tokenizer=False)
    assert store == (tmp_path / "models" / "tiny").resolve()
    saved = json.loads((store / "config.json").read_text())
    assert saved["architecture"] == "llama" and saved["config"]["sliding_window"] == 8
    ids = np.random.default_rng(2).integers(0, 128, (1, 20))
    direct = load_model(folder, tokenizer=False)
    restored = load_model(store, tokenizer=False)
    assert restored.config == direct.config
    np.testing.assert_array_equal(restored.logits(ids), direct.logits(ids))
    with pytest.raises(ValueError, match="already exists"):
        convert_to_store(folder, "tiny", models_dir=tmp_path / "models", with_tokenizer=False)


def _llama_cpp_permute(weight, n_head):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half rows -> GGUF interleaved rows)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _hf_to_gguf(model, path, drop=(), reshape=None, qtype=Q.F32, arch="llama"):
    cfg = model.config
    tensors = {}
    for name, param in model.state_dict().items():
        array = param.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[rest]}"
        else:
            gguf_name = GGUF_NAMES[name]
        if gguf_name.endswith("attn_q.weight"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads)
        if gguf_name.endswith("attn_k.weight"):
            array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        if gguf_name == reshape:
            array = array[:, :-32]
        if gguf_name not in drop:
            tensors[gguf_name] = (array, qtype if array.ndim == 2 else Q.F32)
    meta = {"llama.block_count": cfg.num_hidden_layers, "llama.context_length": 256,
            "llama.embedding_length": cfg.hidden_size, "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_attention_heads,
            "llama.attention.head_count_kv": cfg.num_key_value_heads, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": cfg.vocab_size}
    return _write_gguf(path, arch, tensors, meta)


def test_gguf_llama_with_permuted_qk_matches_transformers(tmp_path):
    model, _ = _tiny_hf(tmp_path, "llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    path = _hf_to_gguf(model, tmp_path / "tiny.gguf")
    ours = load_model(path, tokenizer=False)
    assert not ours.config.tie_word_embeddings
    ids = np.random.default_rng(3).integers(0, 128, (1, 24))
    diff = np.abs(ours.logits(ids) - _hf_logits(model, ids)).max()
    print(f"max abs logit diff vs transformers: {diff:.2e} (logits up to {np.abs(_hf_logits(model, ids)).max():.1f})")
    assert diff < 1e-4, diff
    # Q8_0 weights: the loader returns exactly the gguf package's dequantization of each tensor.
    q8 = _hf_to_gguf(model, tmp_path / "q8.gguf", qtype=Q.Q8_0)
    params = load_weights(q8, with_tokenizer=False).params
    wv = next(t for t in open_gguf(q8).tensors if t.name == "blk.1.attn_v.weight")
    np.testing.assert_array_equal(params["layers"]["wv"][1], gguf.quants.dequantize(wv.data, Q.Q8_0).T)


# ---- bad sources -----------------------------------------------------------------------------------------

def test_bad_sources_raise_clear_errors(tmp_path):
    model, folder = _tiny_hf(tmp_path, "llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        load_weights(tmp_path / "no-such.gguf")
    with pytest.raises(FileNotFoundError, match="no store named"):
        load_weights("not-a-model-name")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle checkpoints are refused.*safetensors"):
        load_weights(tmp_path / "pytorch_model.bin")
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text((folder / "config.json").read_text())
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        load_weights(pickle_dir, with_tokenizer=False)
    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    (bert_dir / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_weights(bert_dir, with_tokenizer=False)
    gpt2 = _hf_to_gguf(model, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_weights(gpt2, with_tokenizer=False)
    missing = _hf_to_gguf(model, tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match="missing tensor.*blk.1.ffn_up.weight"):
        load_weights(missing, with_tokenizer=False)
    wrong = _hf_to_gguf(model, tmp_path / "wrong.gguf", reshape="blk.0.ffn_down.weight")
    with pytest.raises(ValueError, match=r"blk.0.ffn_down.weight has shape \(64, 64\), expected \(64, 96\)"):
        load_weights(wrong, with_tokenizer=False)
    odd = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    writer.add_tensor("w", np.zeros((2, 18), np.uint8), raw_dtype=Q.IQ4_NL)  # 2 rows of one 32-value block
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="tensor w has GGML type IQ4_NL, which is not supported"):
        dequantize(open_gguf(odd).tensors[0], str(odd))
