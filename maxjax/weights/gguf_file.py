"""GGUF (llama.cpp) files -> LlamaConfig and Llama-family params, dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K in each head for its interleaved rope; the HF
rotate-half layout used by maxjax is restored here (as transformers' `reverse_permute_weights` does).
Gemma GGUFs store RMSNorm scales with the +1 folded in; it is taken out again (maxjax keeps HF's weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from maxjax.architectures.families import GEMMA_FAMILIES
from maxjax.architectures.llama import LlamaConfig
from maxjax.architectures.registry import GGUF_ARCHITECTURES, gguf_model_type
from maxjax.weights.gguf_blocks import KEPT_TYPES, read_blocks
from maxjax.weights.llama_names import LAYER_TENSORS, assemble_params, param_reader

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
# Architectures whose GGUF Q/K rows carry llama.cpp's rope permutation.
PERMUTED_ARCHITECTURES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)


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
    family = gguf_model_type(arch, source)

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
    num_layers = int(get("block_count"))
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length") or get("expert_feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, source, rope_freqs),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        **_family_switches(meta, arch, family, num_layers, head_dim, hidden // num_heads),
    )


def _family_switches(meta: dict, arch: str, family: str, num_layers: int, head_dim: int,
                     width_per_head: int) -> dict[str, Any]:
    """The LlamaConfig switches of a family, with llama.cpp's metadata keys and conventions."""
    window = meta.get(f"{arch}.attention.sliding_window")
    gemma = family in GEMMA_FAMILIES
    switches: dict[str, Any] = dict(
        sliding_window=int(window) if window else None,
        hidden_act="gelu_tanh" if gemma else "silu", norm_offset=1.0 if gemma else 0.0, embed_scale=gemma,
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"), post_norms=family in ("gemma2", "gemma3_text"),
        attn_logit_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping"),
        query_pre_attn_scalar=_query_pre_attn_scalar(family, num_layers, head_dim, width_per_head))
    if family in ("gemma2", "gemma3_text") and window:
        # an int n (every n-th layer is global) or one bool per layer (True: sliding)
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if family == "gemma2" else 6)
        sliding = ([bool(p) for p in pattern] if isinstance(pattern, (list, tuple))
                   else [bool((i + 1) % int(pattern)) for i in range(num_layers)])
        switches["layer_types"] = tuple("sliding_attention" if s else "full_attention" for s in sliding)
    if family == "gemma3_text":
        switches["rope_local_theta"] = 10000.0  # llama.cpp's fixed base for Gemma 3's sliding layers
    if f"{arch}.expert_count" in meta:  # Qwen3-MoE, or Mixtral as a "llama" GGUF
        switches.update(num_experts=int(meta[f"{arch}.expert_count"]),
                        num_experts_per_tok=int(meta[f"{arch}.expert_used_count"]),
                        moe_intermediate_size=int(meta.get(f"{arch}.expert_feed_forward_length")
                                                  or meta[f"{arch}.feed_forward_length"]),
                        norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", True)))
    return switches


def _query_pre_attn_scalar(family: str, num_layers: int, head_dim: int, width_per_head: int) -> float | None:
    """GGUFs carry no query_pre_attn_scalar: llama.cpp's rule is the head dim, but hidden / heads for the 27B
    Gemma 2 (46 layers) and Gemma 3 (62 layers), as their HF configs say."""
    if family not in ("gemma2", "gemma3_text"):
        return None
    is_27b = num_layers == (46 if family == "gemma2" else 62)
    return float(width_per_head if is_27b else head_dim)


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


def kept_quantized_names(cfg: LlamaConfig, tensors: dict[str, Any]) -> set[str]:
    """The matrices to keep in their file's block format: those of a kept type (`gguf_blocks.KEPT_TYPES`) whose
    every layer has the same type (layers are stacked into one array per weight). The rest is dequantized."""
    keep = {name for name in ("token_embd.weight", "output.weight")
            if name in tensors and tensors[name].tensor_type in KEPT_TYPES}
    for key, (_, pattern, is_matrix) in LAYER_TENSORS.items():
        names = [pattern.format(i=i) for i in range(cfg.num_layers)]
        types = {tensors[n].tensor_type for n in names if n in tensors}
        if is_matrix and len(types) == 1 and types <= KEPT_TYPES:
            keep.update(names)
    return keep


def load_gguf(path: str | Path, dtype=np.float32, progress: bool = False,
              reader: gguf.GGUFReader | None = None, keep_quantized: bool = False,
              lazy: bool = False) -> tuple[LlamaConfig, Any, dict]:
    """(config, params, metadata) of a Llama-family GGUF file (`reader`: the file already opened).

    `keep_quantized`: Q8_0/Q4_0/Q4_1/Q4_K matrices stay in their blocks (see `maxjax.weights.gguf_blocks`).
    `lazy`: params is a `read(key, layer)` function that dequantizes one tensor per call (sharded loads).
    """
    source = str(path)
    reader = reader or open_gguf(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    meta = metadata(reader)
    if "rope_factors_long.weight" in tensors:
        raise ValueError(f"{source}: longrope (rope_factors_long/short tensors, Phi-3 128k) is not supported in "
                         "GGUF files; load the HF safetensors folder, where it is")
    rope_freqs = dequantize(tensors["rope_freqs.weight"], source) if "rope_freqs.weight" in tensors else None
    cfg = config_from_gguf(meta, set(tensors), source, rope_freqs)
    permuted = meta["general.architecture"] in PERMUTED_ARCHITECTURES
    kept = kept_quantized_names(cfg, tensors) if keep_quantized else set()

    def fix(key: str, array: np.ndarray | dict) -> np.ndarray | dict:
        if isinstance(array, dict):  # block weight: every part has the output rows first
            return {part: fix(key, value) for part, value in array.items()}
        if cfg.norm_offset and key.endswith("norm"):
            return array - np.float32(cfg.norm_offset)
        if permuted and key == "wq" and array.shape[0] == cfg.num_heads * cfg.head_dim:
            return unpermute_rows(array, cfg.num_heads)
        if permuted and key == "wk" and array.shape[0] == cfg.num_kv_heads * cfg.head_dim:
            return unpermute_rows(array, cfg.num_kv_heads)
        return array

    def read(name: str) -> np.ndarray | dict:
        return read_blocks(tensors[name]) if name in kept else dequantize(tensors[name], source)

    args = (cfg, "gguf", read, set(tensors), source)
    params = (param_reader(*args, dtype=dtype, fix=fix) if lazy
              else assemble_params(*args, dtype=dtype, fix=fix, progress=progress))
    return cfg, params, meta
