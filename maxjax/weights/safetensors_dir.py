"""HF checkpoint folders (config.json + *.safetensors, sharded or not) -> LlamaConfig and Llama params.

Only safetensors are read. Pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`) can run arbitrary code
when loaded, so they are refused with a note on how to convert them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from maxjax.architectures.llama import LlamaConfig
from maxjax.architectures.registry import resolve_hf
from maxjax.weights.files import open_safetensors, read_json_object
from maxjax.weights.llama_names import assemble_params, checkpoint_tensors, param_reader

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HINT = ("pickle checkpoints are refused because loading them can run arbitrary code; convert once with "
               "transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
               "safe_serialization=True)` writes model.safetensors; load out_dir")


def refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {PICKLE_HINT}")


def read_hf_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (an HF model folder needs config.json and *.safetensors)")
    return read_json_object(config_path)


def safetensors_files(folder: Path) -> list[Path]:
    """The shard files of a folder: from model.safetensors.index.json when present, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{folder}: only pickle weights found ({', '.join(pickles)}): {PICKLE_HINT}")
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    return files


class SafetensorsReader:
    """Lazy tensor access across shards; bfloat16 tensors (which numpy cannot name) come through ml_dtypes."""

    def __init__(self, files: list[Path]):
        self.location: dict[str, Path] = {}
        for file in files:
            with open_safetensors(file) as f:
                for name in f.keys():
                    self.location[name] = file

    def names(self) -> set[str]:
        return set(self.location)

    def read(self, name: str) -> np.ndarray:
        return self.slices(name)[...]

    def slices(self, name: str) -> "StoredTensor":
        """The tensor without reading it: ``[index]`` reads only that slice from the file."""
        return StoredTensor(self.location[name], name)


class StoredTensor:
    """One safetensors tensor read slice by slice (`get_slice`): a device shard reads only its own part."""

    def __init__(self, file: Path, name: str):
        self.file, self.name = file, name
        with open_safetensors(file) as f:
            stored = f.get_slice(name)
            self.shape = tuple(stored.get_shape())
            self.bf16 = stored.get_dtype() == "BF16"  # numpy cannot name it: read through flax (ml_dtypes)

    def __getitem__(self, index: Any) -> np.ndarray:
        with open_safetensors(self.file, framework="flax" if self.bf16 else "numpy") as f:
            if index is Ellipsis:
                return np.asarray(f.get_tensor(self.name))
            return np.asarray(f.get_slice(self.name)[index])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[...] if dtype is None else self[...].astype(dtype)


# Checkpoint names that differ from the ones `llama_names` maps, as (pattern, replacement): the text decoder of
# multimodal checkpoints (Gemma 3 4B and up) sits under a prefix; Mixtral names its experts w1/w3/w2.
NAME_ALIASES = ((r"^(?:language_model\.model|model\.language_model)\.", "model."),
                (r"^language_model\.lm_head\.", "lm_head."),
                (r"\.block_sparse_moe\.", ".mlp."),
                (r"(\.mlp\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
                (r"(\.mlp\.experts\.\d+)\.w3\.", r"\1.up_proj."),
                (r"(\.mlp\.experts\.\d+)\.w2\.", r"\1.down_proj."))


def checkpoint_aliases(names: set[str]) -> dict[str, str]:
    """Mapped name -> stored name for every stored name that NAME_ALIASES renames."""
    aliases = {}
    for name in names:
        mapped = name
        for pattern, replacement in NAME_ALIASES:
            mapped = re.sub(pattern, replacement, mapped)
        if mapped != name and mapped not in names:
            aliases[mapped] = name
    return aliases


def load_safetensors_dir(folder: str | Path, dtype=np.float32, progress: bool = False,
                         lazy: bool = False) -> tuple[LlamaConfig, Any, dict]:
    """(config, params, hf_config) of an HF folder of a supported family (`maxjax.architectures.registry`).

    `lazy`: params is a `read(key, layer)` function that reads one tensor per call (sharded loads)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    refuse_pickle(folder)
    hf_config = read_hf_config(folder)
    _, cfg = resolve_hf(hf_config)
    reader = SafetensorsReader(safetensors_files(folder))
    aliases = checkpoint_aliases(reader.names())
    read = reader.slices if lazy else reader.read
    args = (cfg, "hf", lambda name: read(aliases.get(name, name)), reader.names() | set(aliases), str(folder))
    params = param_reader(*args, dtype=dtype) if lazy else assemble_params(*args, dtype=dtype, progress=progress)
    return cfg, params, hf_config


def save_safetensors_dir(folder: str | Path, cfg: LlamaConfig, params: dict) -> Path:
    """An HF folder (config.json + model.safetensors) of numpy params: what `load_safetensors_dir` reads."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(params, "hf"), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return folder
