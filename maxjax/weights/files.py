"""Reading the files of a model folder with errors that name the file: JSON objects and safetensors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, index files): ValueError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a {type(data).__name__}")
    return data


@contextlib.contextmanager
def open_safetensors(path: Path, framework: str = "numpy") -> Iterator[Any]:
    """``safe_open`` whose failures (a corrupt header, truncated data) are ValueErrors naming the file."""
    try:
        with safe_open(str(path), framework=framework) as f:
            yield f
    except SafetensorError as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from error


def read_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of one safetensors file as numpy arrays."""
    with open_safetensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}
