"""maxjax: a JAX/XLA compiled model runtime implementing the MAX inference interfaces.

The top-level names load lazily, so ``import maxjax`` (and ``maxjax.interfaces``) stays free of JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "maxjax.models",
    "load_pipeline": "maxjax.pipelines.registry",
    "LLM": "maxjax.pipelines.llm",
    "embed": "maxjax.pipelines.embeddings",
    "TTS": "maxjax.pipelines.audio",
    "convert_to_store": "maxjax.weights",
}

__all__ = sorted(_EXPORTS)


_SUBMODULES = {"interfaces", "context", "tokenizers", "architectures", "weights", "runtime", "pipelines", "models"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"maxjax.{name}")
    raise AttributeError(f"module 'maxjax' has no attribute {name!r}")
