"""GGUF (llama.cpp) files -> LlamaConfig and Llama params, dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K in each head for its interleaved rope; the HF
rotate-half layout used by maxjax is restored here (as transformers' `reverse_permute_weights` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from maxjax.architectures.llama import LlamaConfig
from maxjax.weights.llama_names import assemble_params, param_reader

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
# Architectures whose GGUF Q/K rows carry llama.cpp's rope permutation.
PERMUTED_ARCHITECTURES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError/struct errors on a corrupt header
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Model metadata as Python values; of the tokenizer only the vocabulary size (the tokenizer reads the rest)."""
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith(("GGUF.", "tokenizer."))}
    if "tokenizer.ggml.tokens" in reader.fields:
        meta["tokenizer.vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return meta


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str,
                     rope_freqs: np.ndarray | None = None) -> LlamaConfig:
    """LlamaConfig from `{arch}.*` metadata; the output embedding is tied when `output.weight` is absent."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{source}: GGUF metadata key {arch}.{key} is missing")
        return value

    hidden, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{source}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dim}, "
                         f"head dim {head_dim}) are not supported")
    vocab_size = int(meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.vocab_size") or 0)
    if not vocab_size:
        raise ValueError(f"{source}: GGUF has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, source, rope_freqs),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=None,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )


def _rope_scaling(meta: dict, arch: str, source: str, rope_freqs: np.ndarray | None) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None:  # llama3-style scaling is baked into per-frequency divisors
        return {"rope_type": "freq_factors", "factors": tuple(float(f) for f in rope_freqs)}
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise ValueError(f"{source}: GGUF {arch}.rope.scaling.type {kind!r} is not supported (supported: linear)")


def dequantize(tensor: Any, source: str) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (row-major, HF [out, in] order for matrices)."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"{source}: tensor {tensor.name} has GGML type {tensor.tensor_type.name}, which is not "
                         f"supported (supported: {names})")
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(array, np.float32).reshape(shape)


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation: weight [heads*Dh, in] -> rotate-half row order."""
    head_half = weight.shape[0] // num_heads // 2
    return (weight.reshape(num_heads, head_half, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def load_gguf(path: str | Path, dtype=np.float32, progress: bool = False,
              reader: gguf.GGUFReader | None = None, lazy: bool = False) -> tuple[LlamaConfig, Any, dict]:
    """(config, params, metadata) of a Llama-family GGUF file (`reader`: the file already opened).

    `lazy`: params is a `read(key, layer)` function that dequantizes one tensor per call (sharded loads)."""
    source = str(path)
    reader = reader or open_gguf(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    meta = metadata(reader)
    rope_freqs = dequantize(tensors["rope_freqs.weight"], source) if "rope_freqs.weight" in tensors else None
    cfg = config_from_gguf(meta, set(tensors), source, rope_freqs)
    permuted = meta["general.architecture"] in PERMUTED_ARCHITECTURES

    def fix(key: str, array: np.ndarray) -> np.ndarray:
        if permuted and key == "wq" and array.shape[0] == cfg.num_heads * cfg.head_dim:
            return unpermute_rows(array, cfg.num_heads)
        if permuted and key == "wk" and array.shape[0] == cfg.num_kv_heads * cfg.head_dim:
            return unpermute_rows(array, cfg.num_kv_heads)
        return array

    args = (cfg, "gguf", lambda name: dequantize(tensors[name], source), set(tensors), source)
    params = (param_reader(*args, dtype=dtype, fix=fix) if lazy
              else assemble_params(*args, dtype=dtype, fix=fix, progress=progress))
    return cfg, params, meta
