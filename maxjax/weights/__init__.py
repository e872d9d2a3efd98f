"""Loading model weights: GGUF files, HF safetensors folders and the local orbax model store.

Every source becomes a `Weights`: architecture name, config, a numpy param pytree and the tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from maxjax.architectures.llama import LlamaConfig
from maxjax.weights.gguf_file import load_gguf, open_gguf
from maxjax.weights.llama_names import tree_reader
from maxjax.weights.safetensors_dir import load_safetensors_dir
from maxjax.weights.sources import ModelSource, default_gguf, resolve_source
from maxjax.weights.store import load_store_params, models_dir, read_store_config, save_store

__all__ = ["Weights", "ModelSource", "load_weights", "convert_to_store", "resolve_source", "default_gguf",
           "models_dir"]


@dataclasses.dataclass
class Weights:
    architecture: str
    config: LlamaConfig
    params: Any  # numpy arrays, layers stacked (see maxjax.architectures.llama); read(key, layer) when lazy
    tokenizer: Any  # maxjax.tokenizers.HFTokenizer, or None when not requested
    name: str
    source: ModelSource


def _numpy_dtype(dtype: Any) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError as error:
        raise ValueError(f"dtype {dtype!r} is not a numpy/JAX dtype (e.g. 'float32', 'bfloat16')") from error


def load_weights(source: str | Path | ModelSource | None = None, dtype: Any = "float32",
                 with_tokenizer: bool = True, progress: bool = False, keep_quantized: bool = False,
                 lazy: bool = False, store_shardings: Callable[[LlamaConfig], Any] | None = None) -> Weights:
    """Config, params (numpy, `dtype`) and tokenizer of any supported source (see `resolve_source`).

    `keep_quantized`: a GGUF file's quantized matrices stay in their blocks (`maxjax.weights.gguf_blocks`).
    `lazy`: params is a `read(key, layer)` function (`llama_names.param_reader`) that loads one tensor per
    call, for loads that place each tensor onto its devices before reading the next. A store is then restored
    onto the shardings `store_shardings(config)` gives (None: to the host).
    """
    resolved = source if isinstance(source, ModelSource) else resolve_source(source)
    np_dtype = _numpy_dtype(dtype)
    if keep_quantized and resolved.kind != "gguf":
        raise ValueError(f"quantize='gguf' keeps a GGUF file's blocks, but {resolved.path} is a {resolved.kind} "
                         "source (use quantize='int8' or a .gguf file)")
    tokenizer = None
    if resolved.kind == "gguf":
        reader = open_gguf(resolved.path)  # opened once for weights and tokenizer
        cfg, params, _ = load_gguf(resolved.path, np_dtype, progress=progress, reader=reader,
                                   keep_quantized=keep_quantized, lazy=lazy)
        if with_tokenizer:
            from maxjax.tokenizers import HFTokenizer

            tokenizer = HFTokenizer.from_gguf(reader)
    elif resolved.kind == "hf":
        cfg, params, _ = load_safetensors_dir(resolved.path, np_dtype, progress=progress, lazy=lazy)
        if with_tokenizer:
            from maxjax.tokenizers import HFTokenizer

            tokenizer = HFTokenizer.from_dir(resolved.path)
    elif resolved.kind == "store":
        _, cfg, _ = read_store_config(resolved.path)
        shardings = store_shardings(cfg) if lazy and store_shardings is not None else None
        params = load_store_params(resolved.path, np_dtype, shardings)
        if lazy:
            params = tree_reader(params)
        if with_tokenizer and (resolved.path / "tokenizer").is_dir():
            from maxjax.tokenizers import HFTokenizer

            tokenizer = HFTokenizer.from_dir(resolved.path / "tokenizer")
    else:
        raise ValueError(f"model source kind {resolved.kind!r} is unknown (expected gguf, hf or store)")
    return Weights("llama", cfg, params, tokenizer, resolved.name, resolved)


def convert_to_store(source: str | Path | None, name: str, models_dir: str | Path | None = None,
                     dtype: Any = "float32", overwrite: bool = False, with_tokenizer: bool = True) -> Path:
    """Read `source` once and write it as `models_dir/name/` (orbax params + config.json + tokenizer files)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"store name {name!r} must be a plain folder name")
    from maxjax.weights import store

    weights = load_weights(source, dtype, with_tokenizer=with_tokenizer, progress=True)
    folder = store.models_dir(models_dir) / name
    return save_store(folder, weights.architecture, weights.config, weights.params, weights.tokenizer,
                      str(weights.source.path), overwrite=overwrite)
