"""PEFT LoRA adapter folders -> per-module low-rank matrices in maxjax's layout (numpy, no JAX).

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (pickle ``adapter_model.bin`` is
refused: loading it can run arbitrary code). PEFT stores, per adapted linear layer ``W`` ([out, in]),
``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r], and computes ``W x + B (A x) * scale`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Here A becomes [in, r] and B [r, out]
(``x @ A @ B``, as the model's ``x @ W``), and the scale is folded into B once at load, as vLLM does, so serving
multiplies nothing extra. Ranks and alphas may differ per module (``rank_pattern`` / ``alpha_pattern``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from maxjax.architectures.llama import LlamaConfig

# PEFT module name -> (input width, output width) as functions of the model config.
MODULE_SHAPES = {
    "q_proj": lambda c: (c.hidden_size, c.num_heads * c.head_dim),
    "k_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
    "v_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
    "o_proj": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    "gate_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "up_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "down_proj": lambda c: (c.intermediate_size, c.hidden_size),
}
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(MODULE_SHAPES)
                     + r")\.lora_([AB])\.weight$")
# Config switches for LoRA variants whose math differs from plain LoRA: refused rather than served wrong.
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "layer_replication": "layer replication",
                "alora_invocation_tokens": "activated LoRA", "trainable_token_indices": "trainable tokens",
                "modules_to_save": "modules_to_save (fully trained extra modules)", "use_bdlora": "BD-LoRA"}
PICKLE_ADAPTER_HINT = ("pickle adapters are refused because loading them can run arbitrary code; convert once with "
                       "peft: `PeftModel.from_pretrained(base, dir).save_pretrained(out_dir, safe_serialization=True)` "
                       "writes adapter_model.safetensors")


@dataclasses.dataclass
class LoraAdapter:
    """One adapter: for each adapted module, A [L, in, r] and B [L, r, out] (scale folded in; zeros for layers
    the adapter leaves alone). ``rank`` is the largest rank of any module."""

    name: str
    path: Path
    rank: int
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def target_modules(self) -> list[str]:
        return [m for m in MODULE_SHAPES if m in self.weights]


def _read_config(folder: Path) -> dict:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no adapter_config.json (a PEFT LoRA adapter folder holds adapter_config.json "
                         "and adapter_model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: invalid JSON ({error})") from error
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{config_path}: {key}={config[key]!r}: {what} is not supported (plain LoRA only)")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out=true (Conv1D/GPT-2 layout) is not a Llama adapter")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(MODULE_SHAPES))
        if unknown:
            raise ValueError(f"{config_path}: target_modules {unknown} are not supported; LoRA applies to "
                             f"{list(MODULE_SHAPES)}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{config_path}: r must be a positive int and lora_alpha a number, got r={r!r}, "
                         f"lora_alpha={alpha!r}")
    return config


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module path's end (a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default


def _weights_file(folder: Path) -> Path:
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        return path
    pickles = sorted(p.name for p in folder.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickles:
        raise ValueError(f"{folder}: only pickle adapter weights found ({', '.join(pickles)}): {PICKLE_ADAPTER_HINT}")
    raise ValueError(f"{folder}: no adapter_model.safetensors")


def load_lora_adapter(path: str | Path, cfg: LlamaConfig, name: str | None = None) -> LoraAdapter:
    """Reads a PEFT LoRA folder for a model of config ``cfg``; ValueError on anything that does not fit it."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"LoRA adapter {str(path)!r}: not a folder (expected a PEFT adapter folder)")
    config = _read_config(folder)
    file = _weights_file(folder)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with safe_open(str(file), framework="numpy") as f:
        for tensor_name in f.keys():
            match = _TENSOR.search(tensor_name)
            if match is None:
                raise ValueError(f"{file}: tensor {tensor_name} is not a LoRA matrix of a q/k/v/o/gate/up/down "
                                 "projection (embedding, lm_head and other modules are not supported)")
            layer, module, which = int(match[1]), match[2], match[3]
            if layer >= cfg.num_layers:
                raise ValueError(f"{file}: tensor {tensor_name} is for layer {layer}, but the model has "
                                 f"{cfg.num_layers} layers: the adapter was trained for another base model")
            pairs.setdefault((layer, module), {})[which] = np.asarray(f.get_tensor(tensor_name), np.float32)
    if not pairs:
        raise ValueError(f"{file}: no LoRA tensors")
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    max_rank = 0
    for (layer, module), pair in sorted(pairs.items()):
        module_path = f"model.layers.{layer}.{'mlp' if module in MLP_MODULES else 'self_attn'}.{module}"
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{file}: {module_path} has lora_{''.join(pair)} without its pair")
        rank = _pattern_value(config.get("rank_pattern"), module_path, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), module_path, config["lora_alpha"])
        d_in, d_out = MODULE_SHAPES[module](cfg)
        a, b = pair["A"], pair["B"]  # [r, in], [out, r]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise ValueError(f"{file}: {module_path} has lora_A {a.shape} and lora_B {b.shape}, expected "
                             f"{(rank, d_in)} and {(d_out, rank)} (rank {rank}, base {d_out}x{d_in}): the adapter "
                             "does not match this model's shapes")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if module not in weights:
            weights[module] = (np.zeros((cfg.num_layers, d_in, rank), np.float32),
                               np.zeros((cfg.num_layers, rank, d_out), np.float32))
        stacked_a, stacked_b = weights[module]
        if stacked_a.shape[-1] < rank:  # a larger rank from rank_pattern: widen (zero columns change nothing)
            stacked_a = np.pad(stacked_a, ((0, 0), (0, 0), (0, rank - stacked_a.shape[-1])))
            stacked_b = np.pad(stacked_b, ((0, 0), (0, rank - stacked_b.shape[1]), (0, 0)))
        stacked_a[layer, :, :rank] = a.T
        stacked_b[layer, :rank] = (b * np.float32(scale)).T
        weights[module] = (stacked_a, stacked_b)
        max_rank = max(max_rank, rank)
    return LoraAdapter(name or folder.name, folder, max_rank, weights)
