"""BERT encoder parity: tiny random configs against HF transformers, the real all-MiniLM-L6-v2 against
sentence-transformers, and the weight loader's errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from maxjax.architectures.bert import BertConfig, encode
from maxjax.weights.bert import load_bert, params_from_tensors, read_sentence_head, safetensors_files

TINY_HF_CONFIG = {
    "model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "max_position_embeddings": 40, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "hidden_act": "gelu", "pad_token_id": 0,
}

encode_jit = jax.jit(encode, static_argnums=1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def random_tensors(cfg: BertConfig, seed: int = 0, prefix: str = ""):
    """A HF-named BERT state dict with random values (torch Linear layout), and the torch model."""
    import torch
    from transformers import BertConfig as HFBertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(HFBertConfig(**TINY_HF_CONFIG), add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms start at 1/0: randomise so errors cannot hide
            p.add_(0.1 * torch.randn_like(p))
    return {prefix + k: v.numpy().copy() for k, v in model.state_dict().items()}, model


def reference_pool(states: np.ndarray, lengths: np.ndarray, mode: str) -> np.ndarray:
    mask = (np.arange(states.shape[1])[None] < lengths[:, None])[..., None]
    if mode == "cls":
        return states[:, 0]
    if mode == "max":
        return np.where(mask, states, -1e9).max(1)
    summed = (states * mask).sum(1)
    return summed / (np.sqrt(lengths)[:, None] if mode == "mean_sqrt_len" else lengths[:, None])


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len"])
def test_tiny_bert_matches_transformers(pooling):
    import torch

    cfg = BertConfig.from_hf(TINY_HF_CONFIG, pooling=pooling, normalize=False)
    tensors, model = random_tensors(cfg)
    params = params_from_tensors(tensors, cfg)
    rng = np.random.default_rng(1)
    lengths = np.array([16, 3, 9, 1], np.int32)
    ids = rng.integers(1, cfg.vocab_size, size=(4, 16)).astype(np.int32)
    ids[np.arange(16)[None] >= lengths[:, None]] = 0
    with torch.no_grad():
        mask = torch.tensor(np.arange(16)[None] < lengths[:, None]).long()
        states = model(input_ids=torch.tensor(ids).long(), attention_mask=mask).last_hidden_state.numpy()
    expected = reference_pool(states, lengths, pooling)
    got = np.asarray(encode_jit(params, cfg, ids, lengths))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_normalize_and_prefix(tmp_path):
    cfg = BertConfig.from_hf(TINY_HF_CONFIG, normalize=True)
    tensors, _ = random_tensors(cfg, prefix="bert.")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    loaded_cfg, params = load_bert(tmp_path)
    assert (loaded_cfg.pooling, loaded_cfg.normalize, loaded_cfg.max_seq_length) == ("cls", True, 40)
    ids = np.array([[5, 6, 7, 0]], np.int32)
    out = np.asarray(encode_jit(params, loaded_cfg, ids, np.array([3], np.int32)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    unnormalised = encode_jit(params, dataclasses.replace(loaded_cfg, normalize=False), ids, np.array([3], np.int32))
    np.testing.assert_allclose(out, unnormalised / np.linalg.norm(unnormalised), atol=1e-6)


def test_loader_errors(tmp_path):
    cfg = BertConfig.from_hf(TINY_HF_CONFIG)
    tensors, _ = random_tensors(cfg)
    missing = dict(tensors)
    del missing["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
        params_from_tensors(missing, cfg)
    wrong = dict(tensors, **{"encoder.layer.0.intermediate.dense.weight": np.zeros((63, 32), np.float32)})
    with pytest.raises(ValueError, match=r"intermediate.dense.weight.*\(63, 32\).*\(64, 32\)"):
        params_from_tensors(wrong, cfg)
    with pytest.raises(ValueError, match="not a BERT checkpoint"):
        params_from_tensors({"lm_head.weight": np.zeros((2, 2), np.float32)}, cfg)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        safetensors_files(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        safetensors_files(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf(dict(TINY_HF_CONFIG, position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="num_attention_heads"):
        BertConfig.from_hf({k: v for k, v in TINY_HF_CONFIG.items() if k != "num_attention_heads"})
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        read_sentence_head(tmp_path)


# ---------------------------------------------------------------- real model vs sentence-transformers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "",
    "Ünïcödé façade — naïve café in Zürich; 東京は日本の首都です。 Emoji: 🚀🔥 and Ελληνικά.",
    " ".join(f"token{i} is part of a very long passage about embeddings." for i in range(80)),  # > 256 pieces
    "Sentence embeddings map text to vectors so that similar meanings lie close together.",
]


@pytest.fixture(scope="module")
def reference(minilm_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_bert(minilm_dir)


def _st_ids(reference, text: str) -> np.ndarray:
    return reference.tokenize([text])["input_ids"][0].numpy().astype(np.int32)


def _pad(rows: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, np.array([len(r) for r in rows], np.int32)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(reference, minilm):
    cfg, params = minilm
    assert (cfg.pooling, cfg.normalize, cfg.max_seq_length) == ("mean", True, 256)
    expected = reference.encode(SENTENCES, convert_to_numpy=True)
    rows = [_st_ids(reference, s) for s in SENTENCES]
    assert max(len(r) for r in rows) == 256 and min(len(r) for r in rows) == 2
    cosines = []
    for row, want in zip(rows, expected):  # alone, padded to a bucket
        ids, lengths = _pad([row], 256 if len(row) > 128 else 128)
        cosines.append(cosine(np.asarray(encode_jit(params, cfg, ids, lengths))[0], want))
    ids, lengths = _pad(rows + [rows[0][:0]] * 2, 256)  # mixed lengths plus two empty padding rows
    batch = np.asarray(encode_jit(params, cfg, ids, lengths))[: len(rows)]
    cosines.extend(cosine(batch, expected))
    print(f"minimum cosine vs sentence-transformers: {min(cosines):.9f} (1 - cos = {1 - min(cosines):.1e})")
    assert min(cosines) >= 0.99999
    np.testing.assert_allclose(batch, expected, atol=2e-5)
