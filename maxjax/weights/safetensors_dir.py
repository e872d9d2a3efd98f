"""HF checkpoint folders (config.json + *.safetensors, sharded or not) -> LlamaConfig and Llama params.

Only safetensors are read. Pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`) can run arbitrary code
when loaded, so they are refused with a note on how to convert them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from maxjax.architectures.llama import LlamaConfig
from maxjax.architectures.registry import resolve_hf
from maxjax.weights.files import open_safetensors, read_json_object
from maxjax.weights.llama_names import assemble_params

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
        file = self.location[name]
        with open_safetensors(file) as f:
            if f.get_slice(name).get_dtype() != "BF16":
                return f.get_tensor(name)
        with open_safetensors(file, framework="flax") as f:
            return np.asarray(f.get_tensor(name))


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


def load_safetensors_dir(folder: str | Path, dtype=np.float32,
                         progress: bool = False) -> tuple[LlamaConfig, dict, dict]:
    """(config, params, hf_config) of an HF folder of a supported family (`maxjax.architectures.registry`)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    refuse_pickle(folder)
    hf_config = read_hf_config(folder)
    _, cfg = resolve_hf(hf_config)
    reader = SafetensorsReader(safetensors_files(folder))
    aliases = checkpoint_aliases(reader.names())
    params = assemble_params(cfg, "hf", lambda name: reader.read(aliases.get(name, name)),
                             reader.names() | set(aliases), str(folder), dtype=dtype, progress=progress)
    return cfg, params, hf_config
