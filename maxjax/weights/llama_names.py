"""Checkpoint tensor names -> Llama-family param paths, for HF safetensors and GGUF, and the stacking of layers.

A loader supplies `read(name) -> np.ndarray` in HF layout ([out, in] for matrices) plus the set of names the
file holds; `assemble_params` checks every shape, transposes matrices to [in, out], stacks layers (and the
experts of a mixture-of-experts layer, `{j}` in HF names) on a leading axis and casts to the requested dtype.
Checkpoints with fused Q/K/V or gate/up tensors (Phi-3) are split first (`unfuse`). A GGUF block weight (a dict, see
`maxjax.weights.gguf_blocks`) is kept as stored, out-major.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

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
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", False),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", False),
    "post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight", False),
    "router": ("model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight", True),
    "e_gate": ("model.layers.{i}.mlp.experts.{j}.gate_proj.weight", "blk.{i}.ffn_gate_exps.weight", True),
    "e_up": ("model.layers.{i}.mlp.experts.{j}.up_proj.weight", "blk.{i}.ffn_up_exps.weight", True),
    "e_down": ("model.layers.{i}.mlp.experts.{j}.down_proj.weight", "blk.{i}.ffn_down_exps.weight", True),
}

# Gemma 2/3 norm around both sub-blocks: HF's "post_attention_layernorm" is then the attention's output norm.
POST_NORM_TENSORS: dict[str, tuple[str, str, bool]] = {
    "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight",
                       False),
    "mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight", False),
}

# Fused checkpoint tensors (Phi-3) -> the separate params they hold, in row order.
FUSED_TENSORS: dict[str, tuple[tuple[str, str], tuple[str, ...]]] = {
    "qkv": (("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight"), ("wq", "wk", "wv")),
    "gate_up": (("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight"), ("w_gate", "w_up")),
}

FORMAT_COLUMN = {"hf": 0, "gguf": 1}


def layer_tensors(cfg: LlamaConfig | None = None) -> dict[str, tuple[str, str, bool]]:
    """The per-layer name table of a config (Gemma 2/3 name their norms differently)."""
    if cfg is not None and cfg.post_norms:
        return {**LAYER_TENSORS, **POST_NORM_TENSORS}
    return LAYER_TENSORS


def checkpoint_name(key: str, fmt: str, layer: int | None = None, cfg: LlamaConfig | None = None) -> str:
    """The tensor name of param `key` (a global key, or a layer key with its index) in format `fmt`."""
    table = GLOBAL_TENSORS if layer is None else layer_tensors(cfg)
    return table[key][FORMAT_COLUMN[fmt]].format(i=layer, j="{j}")


def _entries(cfg: LlamaConfig, fmt: str) -> Iterable[tuple[str | None, str, int | None, str, bool]]:
    """(group, key, layer, checkpoint name, is_matrix) for every tensor the config needs."""
    shapes = param_shapes(cfg)
    table = layer_tensors(cfg)
    for key in shapes:
        if key != "layers":
            yield None, key, None, checkpoint_name(key, fmt), GLOBAL_TENSORS[key][2]
    for layer in range(cfg.num_layers):
        for key in shapes["layers"]:
            yield "layers", key, layer, checkpoint_name(key, fmt, layer, cfg), table[key][2]


def unfuse(cfg: LlamaConfig, fmt: str, read: Callable[[str], np.ndarray],
           names: set[str]) -> tuple[Callable[[str], np.ndarray], set[str]]:
    """`read` and `names` with fused Q/K/V and gate/up tensors also readable under their separate names."""
    rows = {"wq": cfg.num_heads * cfg.head_dim, "wk": cfg.num_kv_heads * cfg.head_dim,
            "wv": cfg.num_kv_heads * cfg.head_dim, "w_gate": cfg.intermediate_size, "w_up": cfg.intermediate_size}
    parts: dict[str, tuple[str, int, int]] = {}  # separate name -> (fused name, first row, end row)
    for layer in range(cfg.num_layers):
        for fused_names, keys in FUSED_TENSORS.values():
            fused = fused_names[FORMAT_COLUMN[fmt]].format(i=layer)
            separate = [checkpoint_name(key, fmt, layer, cfg) for key in keys]
            if fused not in names or separate[0] in names:
                continue
            start = 0
            for key, name in zip(keys, separate):
                parts[name] = (fused, start, start + rows[key])
                start += rows[key]
    if not parts:
        return read, names

    def read_part(name: str) -> np.ndarray:
        if name not in parts:
            return read(name)
        fused, start, end = parts[name]
        return read(fused)[start:end]

    return read_part, names | set(parts)


def _read_stacked(read: Callable[[str], np.ndarray], name: str, count: int) -> np.ndarray:
    """A tensor, or (HF per-expert names with `{j}`) the `count` experts' tensors stacked on axis 0."""
    if "{j}" not in name:
        return read(name)
    return np.stack([read(name.format(j=j)) for j in range(count)])


def _expand(name: str, count: int) -> list[str]:
    return [name.format(j=j) for j in range(count)] if "{j}" in name else [name]


class ParamSlices:
    """A param in maxjax layout whose ``[index]`` reads only that part of the stored tensor (transposed for
    matrices); ``np.asarray`` reads it whole."""

    def __init__(self, stored: Any, is_matrix: bool, dtype: np.dtype):
        self.stored, self.is_matrix, self.dtype = stored, is_matrix, dtype
        self.shape = tuple(stored.shape[::-1] if is_matrix else stored.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        if index is Ellipsis:
            part = self.stored[...]
        else:
            index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
            part = self.stored[index[::-1] if self.is_matrix else index]
        return np.ascontiguousarray((part.T if self.is_matrix else part).astype(self.dtype, copy=False))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[...] if dtype is None else self[...].astype(dtype)


ParamReader = Callable[[str, "int | None"], "np.ndarray | ParamSlices | dict"]


def param_reader(cfg: LlamaConfig, fmt: str, read: Callable[[str], np.ndarray], names: set[str], source: str,
                 dtype=np.float32, fix: Callable[[str, np.ndarray], np.ndarray] | None = None) -> ParamReader:
    """``read_param(key, layer)`` -> one param in maxjax layout ([in, out], `dtype`); `layer` None for globals.

    Reads one tensor per call (a mixture-of-experts layer's experts stacked), so a sharded load holds at most one
    tensor on the host at a time. `fix(key, array)` is a per-format correction applied in HF layout before the
    shape check (GGUF's Q/K row permutation). A GGUF block weight (a dict) comes back as stored, out-major.
    Raises ValueError naming the source and tensor on a missing tensor (checked for every tensor up front) or a
    wrong shape.
    """
    shapes = param_shapes(cfg)
    table = layer_tensors(cfg)
    read, names = unfuse(cfg, fmt, read, names)
    missing = [part for *_, name, _ in _entries(cfg, fmt) for part in _expand(name, cfg.num_experts)
               if part not in names]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{source}: missing tensor(s) {shown} expected for a Llama-family model with "
                         f"{cfg.num_layers} layers")

    def read_param(key: str, layer: int | None = None) -> np.ndarray | ParamSlices | dict:
        name = checkpoint_name(key, fmt, layer, cfg)
        is_matrix = (table if layer is not None else GLOBAL_TENSORS)[key][2]
        array = _read_stacked(read, name, cfg.num_experts)
        if fix is not None:
            array = fix(key, array)
        expected = shapes["layers"][key][1:] if layer is not None else shapes[key]
        expected_stored = (*expected[:-2], expected[-1], expected[-2]) if is_matrix else expected
        stored = block_shape(array) if isinstance(array, dict) else tuple(array.shape)
        if tuple(stored) != tuple(expected_stored):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(stored)}, expected "
                             f"{tuple(expected_stored)} for config {_shape_summary(cfg)}")
        if isinstance(array, dict):  # kept quantized: out-major [O, D] as stored, no transpose or cast
            return array
        if not isinstance(array, np.ndarray):  # a sliceable file tensor (safetensors): read shard by shard
            return ParamSlices(array, is_matrix, np.dtype(dtype))
        return np.ascontiguousarray((array.swapaxes(-1, -2) if is_matrix else array).astype(dtype, copy=False))

    return read_param


def tree_reader(params: dict) -> ParamReader:
    """``read(key, layer)`` over a param tree with stacked layers (host or device arrays)."""
    return lambda key, layer=None: params[key] if layer is None else params["layers"][key][layer]


def assemble_params(cfg: LlamaConfig, fmt: str, read: Callable[[str], np.ndarray], names: set[str],
                    source: str, dtype=np.float32, fix: Callable[[str, np.ndarray], np.ndarray] | None = None,
                    progress: bool = False) -> dict:
    """Read every tensor the config needs and build the param pytree (numpy, `dtype`, layers stacked)."""
    read_param = param_reader(cfg, fmt, read, names, source, dtype, fix)
    shapes = param_shapes(cfg)
    params: dict = {key: None for key in shapes if key != "layers"}
    params["layers"] = {key: np.empty(shape, dtype) for key, shape in shapes["layers"].items()}
    layer_blocks: dict[str, list] = {}  # GGUF block weights per layer, stacked at the end
    for group, key, layer, _, _ in tqdm(list(_entries(cfg, fmt)), desc="tensors", unit="tensor",
                                        disable=not progress):
        array = read_param(key, layer)
        if group and isinstance(array, dict):
            layer_blocks.setdefault(key, [None] * cfg.num_layers)[layer] = array
        elif group:
            params["layers"][key][layer] = array
        else:
            params[key] = array if isinstance(array, dict) else np.asarray(array)
    for key, per_layer in layer_blocks.items():
        params["layers"][key] = {part: np.stack([w[part] for w in per_layer]) for part in per_layer[0]}
    return params


def _shape_summary(cfg: LlamaConfig) -> str:
    return (f"(vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, heads "
            f"{cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim})")


def checkpoint_tensors(params: dict, fmt: str) -> dict[str, np.ndarray]:
    """The inverse of `assemble_params`: params (layers stacked) under their `fmt` names, matrices [out, in]."""
    column = FORMAT_COLUMN[fmt]
    out = {GLOBAL_TENSORS[k][column]: np.ascontiguousarray(v.T if GLOBAL_TENSORS[k][2] else v)
           for k, v in params.items() if k != "layers"}
    for key, stacked in params["layers"].items():
        name, is_matrix = LAYER_TENSORS[key][column], LAYER_TENSORS[key][2]
        out.update({name.format(i=i): np.ascontiguousarray(a.T if is_matrix else a) for i, a in enumerate(stacked)})
    return out
