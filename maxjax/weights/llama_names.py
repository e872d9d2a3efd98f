"""Checkpoint tensor names -> Llama param paths, for HF safetensors and GGUF, and the stacking of layers.

A loader supplies `read(name) -> np.ndarray` in HF layout ([out, in] for matrices) plus the set of names the
file holds; `assemble_params` checks every shape, transposes matrices to [in, out], stacks layers on a leading
axis and casts to the requested dtype. A GGUF block weight (a dict, see `maxjax.weights.gguf_blocks`) is kept
as stored, out-major.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from maxjax.architectures.llama import LlamaConfig, param_shapes
from maxjax.weights.gguf_blocks import block_shape

# param key -> (HF name, GGUF name, is_matrix). Matrices are stored [out, in] and transposed to [in, out].
GLOBAL_TENSORS: dict[str, tuple[str, str, bool]] = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight", False),  # [V, D] both sides
    "final_norm": ("model.norm.weight", "output_norm.weight", False),
    "lm_head": ("lm_head.weight", "output.weight", True),
}

# per-layer param key (under "layers") -> (HF name, GGUF name, is_matrix); `{i}` is the layer index.
LAYER_TENSORS: dict[str, tuple[str, str, bool]] = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", False),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", False),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", True),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", True),
}

FORMAT_COLUMN = {"hf": 0, "gguf": 1}


def checkpoint_name(key: str, fmt: str, layer: int | None = None) -> str:
    """The tensor name of param `key` (a global key, or a layer key with its index) in format `fmt`."""
    table = GLOBAL_TENSORS if layer is None else LAYER_TENSORS
    return table[key][FORMAT_COLUMN[fmt]].format(i=layer)


def _entries(cfg: LlamaConfig, fmt: str) -> Iterable[tuple[str | None, str, int | None, str, bool]]:
    """(group, key, layer, checkpoint name, is_matrix) for every tensor the config needs."""
    shapes = param_shapes(cfg)
    for key in shapes:
        if key != "layers":
            yield None, key, None, checkpoint_name(key, fmt), GLOBAL_TENSORS[key][2]
    for layer in range(cfg.num_layers):
        for key in shapes["layers"]:
            yield "layers", key, layer, checkpoint_name(key, fmt, layer), LAYER_TENSORS[key][2]


def assemble_params(cfg: LlamaConfig, fmt: str, read: Callable[[str], np.ndarray], names: set[str],
                    source: str, dtype=np.float32, fix: Callable[[str, np.ndarray], np.ndarray] | None = None,
                    progress: bool = False) -> dict:
    """Read every tensor the config needs and build the param pytree (numpy, `dtype`).

    `fix(key, array)` is a per-format correction applied in HF layout before the shape check (GGUF's Q/K
    row permutation). Raises ValueError naming the source and tensor on a missing tensor or a wrong shape.
    """
    shapes = param_shapes(cfg)
    params: dict = {key: None for key in shapes if key != "layers"}
    params["layers"] = {key: np.empty(shape, dtype) for key, shape in shapes["layers"].items()}
    entries = list(_entries(cfg, fmt))
    missing = [name for *_, name, _ in entries if name not in names]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{source}: missing tensor(s) {shown} expected for a Llama model with "
                         f"{cfg.num_layers} layers")
    layer_blocks: dict[str, list] = {}  # GGUF block weights per layer, stacked at the end
    for group, key, layer, name, is_matrix in tqdm(entries, desc="tensors", unit="tensor", disable=not progress):
        array = read(name)
        if fix is not None:
            array = fix(key, array)
        expected = shapes["layers"][key][1:] if group else shapes[key]
        expected_stored = expected[::-1] if is_matrix else expected
        stored = block_shape(array) if isinstance(array, dict) else tuple(array.shape)
        if tuple(stored) != tuple(expected_stored):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(stored)}, expected "
                             f"{tuple(expected_stored)} for config {_shape_summary(cfg)}")
        if isinstance(array, dict):  # kept quantized: out-major [O, D] as stored, no transpose or cast
            if group:
                layer_blocks.setdefault(key, [None] * cfg.num_layers)[layer] = array
            else:
                params[key] = array
            continue
        array = (array.T if is_matrix else array).astype(dtype)
        if group:
            params["layers"][key][layer] = array
        else:
            params[key] = np.ascontiguousarray(array)
    for key, per_layer in layer_blocks.items():
        params["layers"][key] = {part: np.stack([w[part] for w in per_layer]) for part in per_layer[0]}
    return params


def _shape_summary(cfg: LlamaConfig) -> str:
    return (f"(vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, heads "
            f"{cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim})")
