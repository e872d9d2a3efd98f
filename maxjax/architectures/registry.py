"""Which architecture module and config builder serve a checkpoint, from its config.json or GGUF metadata.

Every text family maxjax serves is a config of the shared decoder in `maxjax.architectures.llama` (see
`families.py`); an unsupported name is a ValueError listing the supported ones.
"""

from __future__ import annotations

from types import ModuleType

from maxjax.architectures import llama
from maxjax.architectures.families import HF_FAMILIES, config_from_hf

# config.json "architectures" class name -> model_type
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3",
}

# Multimodal model_type -> the family of its text decoder (config in "text_config"; the loader reads only it)
HF_MULTIMODAL = {"gemma3": "gemma3_text"}

# GGUF general.architecture -> model_type (the GGUF loader reads the metadata of these; Mixtral GGUFs are
# "llama" files with expert tensors and {arch}.expert_count)
GGUF_ARCHITECTURES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3",
}


def hf_model_type(hf_config: dict) -> str:
    """The family of a config.json: its `model_type`, else its `architectures` class name."""
    model_type = hf_config.get("model_type")
    if model_type in HF_FAMILIES:
        return model_type
    if model_type in HF_MULTIMODAL and isinstance(hf_config.get("text_config"), dict):
        return HF_MULTIMODAL[model_type]
    names = hf_config.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    raise ValueError(f"config.json model_type {model_type!r} / architectures {names!r} is not supported "
                     f"(supported model types: {', '.join(HF_FAMILIES + tuple(HF_MULTIMODAL))}; architectures: "
                     f"{', '.join(HF_ARCHITECTURES)})")


def resolve_hf(hf_config: dict) -> tuple[ModuleType, llama.LlamaConfig]:
    """(architecture module, config) of a transformers config.json dict."""
    model_type = hf_model_type(hf_config)
    if hf_config.get("model_type") in HF_MULTIMODAL:
        hf_config = hf_config["text_config"]
    return llama, config_from_hf(dict(hf_config, model_type=model_type))


def gguf_model_type(architecture: str | None, source: str = "GGUF") -> str:
    """The family of a GGUF `general.architecture`."""
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF general.architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return GGUF_ARCHITECTURES[architecture]
