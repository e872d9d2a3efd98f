"""The local model store: `models/NAME/` = orbax checkpoint of the params + config.json + tokenizer files.

Converting once (GGUF dequantization, safetensors transposes and layer stacking) makes later loads a plain
checkpoint restore that never touches the original source.

    models/NAME/config.json   {"format": "maxjax-store", "architecture": "llama", "config": {...}, "source": ...}
    models/NAME/params/       orbax checkpoint of the param pytree (float32 or the dtype converted with)
    models/NAME/tokenizer/    files written by the tokenizer's `save(dir)`
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from maxjax.architectures.llama import LlamaConfig
from maxjax.weights.files import read_json_object

STORE_FORMAT = "maxjax-store"
STORE_VERSION = 1
CONFIG_FILE = "config.json"


def models_dir(path: str | Path | None = None) -> Path:
    """Store root: the argument, else $MAXJAX_MODELS, else the repository's `models/` folder."""
    if path is not None:
        return Path(path)
    if os.environ.get("MAXJAX_MODELS"):
        return Path(os.environ["MAXJAX_MODELS"])
    import maxjax

    return Path(maxjax.__file__).resolve().parents[1] / "models"


def is_store(path: str | Path) -> bool:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == STORE_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def config_to_json(cfg: LlamaConfig) -> dict:
    data = dataclasses.asdict(cfg)
    if cfg.rope_scaling is not None:
        data["rope_scaling"] = {key: list(value) if isinstance(value, tuple) else value
                                for key, value in cfg.rope_scaling}
    return data


def config_from_json(data: dict, source: str) -> LlamaConfig:
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{source}: unknown LlamaConfig field(s) {sorted(unknown)}")
    return LlamaConfig(**data)


def save_store(folder: Path, architecture: str, cfg: LlamaConfig, params: dict, tokenizer: Any,
               source: str, overwrite: bool = False) -> Path:
    """Write a store folder atomically (into a temporary sibling, then renamed)."""
    import orbax.checkpoint as ocp

    folder = Path(folder).resolve()
    if folder.exists() and not overwrite:
        raise ValueError(f"model store {folder} already exists (pass overwrite=True to replace it)")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / "params", params)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(staging / "tokenizer")
    dtype = str(np.asarray(params["embed"]).dtype)
    (staging / CONFIG_FILE).write_text(json.dumps({
        "format": STORE_FORMAT, "version": STORE_VERSION, "architecture": architecture,
        "config": config_to_json(cfg), "dtype": dtype, "source": source,
    }, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def read_store_config(folder: str | Path) -> tuple[str, LlamaConfig, dict]:
    """(architecture, config, raw config.json) of a store folder."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"model store {folder} has no {CONFIG_FILE}")
    data = read_json_object(folder / CONFIG_FILE)
    if data.get("format") != STORE_FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE}: not a maxjax model store (format {data.get('format')!r})")
    architecture = data.get("architecture")
    if architecture != "llama":
        raise ValueError(f"{folder / CONFIG_FILE}: unknown architecture {architecture!r} (supported: llama)")
    return architecture, config_from_json(data["config"], str(folder / CONFIG_FILE)), data


def load_store_params(folder: str | Path, dtype=np.float32, shardings: Any = None) -> dict:
    """The param pytree of a store, as numpy arrays in `dtype`; or, given a matching tree of `shardings`,
    as device arrays restored straight onto their shards (each device reads only its slice)."""
    import orbax.checkpoint as ocp

    path = Path(folder).resolve() / "params"
    if not path.is_dir():
        raise FileNotFoundError(f"model store {folder} has no params/ checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    if shardings is not None:
        import jax

        stored = checkpointer.metadata(path)
        stored = getattr(stored, "item_metadata", stored)  # orbax >= 0.11 wraps the tree
        target = jax.tree.map(lambda meta, sharding: jax.ShapeDtypeStruct(meta.shape, dtype, sharding=sharding),
                              dict(stored), shardings)
        return checkpointer.restore(path, target)
    params = checkpointer.restore(path)
    return _to_numpy(params, np.dtype(dtype))


def _to_numpy(tree: Any, dtype: np.dtype) -> Any:
    if isinstance(tree, dict):
        return {key: _to_numpy(value, dtype) for key, value in tree.items()}
    array = np.asarray(tree)
    return array if array.dtype == dtype else array.astype(dtype)
