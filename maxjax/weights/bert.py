"""HF BERT safetensors (+ sentence-transformers head config) -> ``BertConfig`` and param pytree.

The mapping from checkpoint names to param paths is declarative (``EMBEDDING_TENSORS``,
``LAYER_TENSORS``); per-layer tensors are stacked on a leading layer axis and Q/K/V fused into one
matrix as load-time transforms. Only safetensors are read: pickle checkpoints (``*.bin``, ``*.pt``)
can run code on load and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from maxjax.architectures.bert import BertConfig, Params
from maxjax.weights.files import read_json_object, read_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
Shape = Callable[[BertConfig], tuple[int, ...]]

# checkpoint name -> (param name, expected torch shape, transpose to input-major)
EMBEDDING_TENSORS: dict[str, tuple[str, Shape, bool]] = {
    "embeddings.word_embeddings.weight": ("word", lambda c: (c.vocab_size, c.hidden_size), False),
    "embeddings.position_embeddings.weight": ("position", lambda c: (c.max_position_embeddings, c.hidden_size), False),
    "embeddings.token_type_embeddings.weight": ("token_type", lambda c: (c.type_vocab_size, c.hidden_size), False),
    "embeddings.LayerNorm.weight": ("ln_scale", lambda c: (c.hidden_size,), False),
    "embeddings.LayerNorm.bias": ("ln_bias", lambda c: (c.hidden_size,), False),
}

# name under ``encoder.layer.{i}.`` -> (param name before stacking, expected torch shape, transpose)
LAYER_TENSORS: dict[str, tuple[str, Shape, bool]] = {
    "attention.self.query.weight": ("q_w", lambda c: (c.hidden_size, c.hidden_size), True),
    "attention.self.query.bias": ("q_b", lambda c: (c.hidden_size,), False),
    "attention.self.key.weight": ("k_w", lambda c: (c.hidden_size, c.hidden_size), True),
    "attention.self.key.bias": ("k_b", lambda c: (c.hidden_size,), False),
    "attention.self.value.weight": ("v_w", lambda c: (c.hidden_size, c.hidden_size), True),
    "attention.self.value.bias": ("v_b", lambda c: (c.hidden_size,), False),
    "attention.output.dense.weight": ("attn_out_w", lambda c: (c.hidden_size, c.hidden_size), True),
    "attention.output.dense.bias": ("attn_out_b", lambda c: (c.hidden_size,), False),
    "attention.output.LayerNorm.weight": ("attn_ln_scale", lambda c: (c.hidden_size,), False),
    "attention.output.LayerNorm.bias": ("attn_ln_bias", lambda c: (c.hidden_size,), False),
    "intermediate.dense.weight": ("mlp_in_w", lambda c: (c.intermediate_size, c.hidden_size), True),
    "intermediate.dense.bias": ("mlp_in_b", lambda c: (c.intermediate_size,), False),
    "output.dense.weight": ("mlp_out_w", lambda c: (c.hidden_size, c.intermediate_size), True),
    "output.dense.bias": ("mlp_out_b", lambda c: (c.hidden_size,), False),
    "output.LayerNorm.weight": ("mlp_ln_scale", lambda c: (c.hidden_size,), False),
    "output.LayerNorm.bias": ("mlp_ln_bias", lambda c: (c.hidden_size,), False),
}

# Prefixes a BERT body may carry in a checkpoint (task heads save it as ``bert.``).
NAME_PREFIXES = ("", "bert.", "model.")


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint file or folder; pickle formats raise."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"weights {path}: pickle checkpoints are not loaded (they can run code); "
                             "convert to safetensors")
        if path.suffix != ".safetensors":
            raise ValueError(f"weights {path}: expected a .safetensors file")
        return [path]
    if not path.is_dir():
        raise ValueError(f"weights: {path} is neither a file nor a folder")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found pickle checkpoints {pickles}, which are not loaded (convert to safetensors)" if pickles else ""
        raise ValueError(f"weights: no .safetensors file in {path}{hint}")
    return files


def read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def _find_prefix(tensors: dict[str, np.ndarray]) -> str:
    anchor = "embeddings.word_embeddings.weight"
    for prefix in NAME_PREFIXES:
        if prefix + anchor in tensors:
            return prefix
    sample = sorted(tensors)[:5]
    raise ValueError(f"weights: missing tensor {anchor!r} (with or without a 'bert.' prefix); "
                     f"this is not a BERT checkpoint (first names: {sample})")


def _take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"weights: missing tensor {name!r}")
    value = tensors[name]
    if tuple(value.shape) != shape:
        raise ValueError(f"weights: tensor {name!r} has shape {tuple(value.shape)}, expected {shape} from config")
    value = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(value.T) if transpose else value


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: BertConfig) -> Params:
    """Map HF BERT tensors to the ``maxjax.architectures.bert`` param pytree (numpy, float32)."""
    prefix = _find_prefix(tensors)
    embeddings = {param: _take(tensors, prefix + name, shape(cfg), transpose)
                  for name, (param, shape, transpose) in EMBEDDING_TENSORS.items()}
    per_layer = [{param: _take(tensors, f"{prefix}encoder.layer.{i}.{name}", shape(cfg), transpose)
                  for name, (param, shape, transpose) in LAYER_TENSORS.items()}
                 for i in range(cfg.num_layers)]
    extra = f"{prefix}encoder.layer.{cfg.num_layers}.attention.self.query.weight"
    if extra in tensors:
        raise ValueError(f"weights: checkpoint has more layers than config.num_hidden_layers={cfg.num_layers}")
    stacked = {param: np.stack([layer[param] for layer in per_layer]) for param in per_layer[0]}
    layers = {
        "qkv_w": np.concatenate([stacked.pop("q_w"), stacked.pop("k_w"), stacked.pop("v_w")], axis=-1),  # [L, D, 3D]
        "qkv_b": np.concatenate([stacked.pop("q_b"), stacked.pop("k_b"), stacked.pop("v_b")], axis=-1),  # [L, 3D]
        **stacked,
    }
    return {"embeddings": embeddings, "layers": layers}


def read_sentence_head(model_dir: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length from a sentence-transformers folder.

    Follows ``modules.json``: the Pooling module's ``config.json`` picks the pooling mode, a listed
    ``Normalize`` module (which needs no folder of its own) turns L2 normalisation on, and
    ``sentence_bert_config.json`` gives ``max_seq_length``. A plain HF folder gets mean pooling
    without normalisation, as sentence-transformers does for one.
    """
    model_dir = Path(model_dir)
    head: dict[str, Any] = {"pooling": "mean", "normalize": False}
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling_file = model_dir / module.get("path", "") / "config.json"
                if pooling_file.is_file():
                    head["pooling"] = _pooling_mode(json.loads(pooling_file.read_text()), pooling_file)
            elif kind == "Normalize":
                head["normalize"] = True
            elif kind not in ("Transformer",):
                raise ValueError(f"modules.json: module type {module.get('type')!r} is not supported "
                                 "(only Transformer, Pooling, Normalize)")
    bert_config_file = model_dir / "sentence_bert_config.json"
    if bert_config_file.is_file():
        max_len = json.loads(bert_config_file.read_text()).get("max_seq_length")
        if max_len is not None:
            head["max_seq_length"] = int(max_len)
    return head


def _pooling_mode(config: dict[str, Any], source: Path) -> str:
    if "pooling_mode" in config and isinstance(config["pooling_mode"], str):
        modes = [config["pooling_mode"].replace("mean_sqrt_len_tokens", "mean_sqrt_len")]
    else:
        flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
                 "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
        modes = [mode for mode, key in flags.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in ("cls", "mean", "max", "mean_sqrt_len"):
        raise ValueError(f"{source}: pooling modes {modes} are not supported (exactly one of cls, mean, max, "
                         "mean_sqrt_len)")
    return modes[0]


def load_bert(model_dir: str | Path) -> tuple[BertConfig, Params]:
    """``BertConfig`` and float32 numpy params from a HF / sentence-transformers BERT folder."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model: {model_dir} has no config.json")
    hf_config = read_json_object(config_file)
    head = read_sentence_head(model_dir)
    max_positions = int(hf_config.get("max_position_embeddings", 512))
    head["max_seq_length"] = min(head.get("max_seq_length", max_positions), max_positions)
    cfg = BertConfig.from_hf(hf_config, **head)
    params = params_from_tensors(read_tensors(safetensors_files(model_dir)), cfg)
    return cfg, params
