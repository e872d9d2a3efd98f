"""Model families as configs of the shared decoder (`maxjax.architectures.llama`): HF `config.json` -> LlamaConfig.

A family differs from Llama only by `LlamaConfig` switches:

| family (model_type)      | switches                                                                          |
|--------------------------|-----------------------------------------------------------------------------------|
| llama, mistral, qwen2    | (Mistral: sliding window on every layer; Qwen2: Q/K/V biases)                     |
| qwen3                    | qk_norm                                                                           |
| qwen3_moe                | qk_norm, routed experts (num_experts, num_experts_per_tok, moe_intermediate_size) |
| mixtral                  | routed experts (weights always renormalized), Mistral's sliding window            |
| gemma                    | gelu_tanh GeGLU, norm_offset 1, embed_scale                                       |
| gemma2                   | + post_norms, attention / final soft-capping, query_pre_attn_scalar, alternating   |
|                          |   sliding and global layers                                                        |
| gemma3_text              | gemma2 without soft-capping + qk_norm, rope_local_theta for sliding layers         |
| phi3                     | fused qkv / gate_up in the checkpoint (split at load), longrope                   |
"""

from __future__ import annotations

from typing import Any

from maxjax.architectures.llama import LlamaConfig

GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")
HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text",
               "phi3")

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}


def _rope(rope: dict[str, Any] | None, hf_config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict or None) from one rope_parameters / rope_scaling dict."""
    rope = dict(rope or {})
    theta = (rope.pop("rope_theta", None) or (hf_config.get("rope_parameters") or {}).get("rope_theta")
             or hf_config.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    rope.pop("partial_rotary_factor", None)
    if kind == "longrope":  # HF derives the factor from the context lengths
        original = rope.get("original_max_position_embeddings") or hf_config["original_max_position_embeddings"]
        rope["original_max_position_embeddings"] = original
        rope.setdefault("factor", hf_config.get("max_position_embeddings", original) / original)
    return float(theta), dict(rope, rope_type=kind)


def _layer_types(hf_config: dict, model_type: str, num_layers: int) -> tuple[str, ...] | None:
    if model_type in ("llama", "mistral", "mixtral"):  # the window, when set, applies to every layer
        return None
    if hf_config.get("layer_types"):
        return tuple(hf_config["layer_types"])
    pattern = {"gemma2": 2, "gemma3_text": hf_config.get("sliding_window_pattern", 6)}.get(model_type)
    if pattern is None:
        return None
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


def _activation(hf_config: dict, model_type: str) -> str:
    name = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or "silu"
    if model_type in GEMMA_FAMILIES and name == "gelu":  # Gemma 1 configs say "gelu"; HF runs the tanh form
        name = "gelu_pytorch_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.json hidden_act {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _sliding_window(hf_config: dict, model_type: str) -> int | None:
    window = hf_config.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf_config.get("use_sliding_window", False):
        return None
    return window or None


def _moe(hf_config: dict, model_type: str) -> dict[str, Any]:
    if model_type == "mixtral":  # every layer routed; the expert MLP width is intermediate_size
        return dict(num_experts=hf_config["num_local_experts"], num_experts_per_tok=hf_config["num_experts_per_tok"],
                    moe_intermediate_size=hf_config["intermediate_size"], norm_topk_prob=True)
    if model_type != "qwen3_moe":
        return {}
    if hf_config.get("mlp_only_layers") or hf_config.get("decoder_sparse_step", 1) != 1:
        raise ValueError("config.json: qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step != 1) "
                         "is not supported; every layer must be a mixture of experts")
    num_experts = hf_config.get("num_local_experts") or hf_config.get("num_experts")  # transformers 5 / 4 name
    return dict(num_experts=num_experts, num_experts_per_tok=hf_config["num_experts_per_tok"],
                moe_intermediate_size=hf_config["moe_intermediate_size"],
                norm_topk_prob=bool(hf_config.get("norm_topk_prob", False)))


def _global_and_local_rope(hf_config: dict, model_type: str) -> dict[str, Any]:
    rope = hf_config.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers >= 5: one rope dict per layer type
        theta, scaling = _rope(rope["full_attention"], hf_config)
        local_theta, local_scaling = _rope(rope.get("sliding_attention"), hf_config)
        if local_scaling is not None:
            raise ValueError("config.json: rope scaling on sliding layers is not supported")
    else:
        theta, scaling = _rope(hf_config.get("rope_scaling") or rope, hf_config)
        local_theta = hf_config.get("rope_local_base_freq")
    if model_type != "gemma3_text":
        local_theta = None
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


def _check_values(hf_config: dict) -> None:
    """Required keys present and of the right kind, so a bad config.json fails here, naming the key."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf_config:
            raise ValueError(f"config.json is missing {key!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"config.json {key} must be a positive int, got {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"config.json {key} must be a positive number, got {value!r}")
    for key in ("rope_parameters", "rope_scaling"):
        if hf_config.get(key) is not None and not isinstance(hf_config[key], dict):
            raise ValueError(f"config.json {key} must be an object, got {hf_config[key]!r}")


def config_from_hf(hf_config: dict) -> LlamaConfig:
    """LlamaConfig from a transformers `config.json` dict of a supported family (see the table above)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"config.json model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(HF_FAMILIES)})")
    _check_values(hf_config)
    if float(hf_config.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 (partial rotary embeddings) is not supported")
    num_heads, num_layers = hf_config["num_attention_heads"], hf_config["num_hidden_layers"]
    gemma = model_type in GEMMA_FAMILIES
    return LlamaConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", gemma)),
        sliding_window=_sliding_window(hf_config, model_type),
        attention_bias=bool(hf_config.get("attention_bias", model_type == "qwen2")),
        hidden_act=_activation(hf_config, model_type),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        post_norms=model_type in ("gemma2", "gemma3_text"),
        attn_logit_softcap=hf_config.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=hf_config.get("final_logit_softcapping") if gemma else None,
        query_pre_attn_scalar=hf_config.get("query_pre_attn_scalar") if model_type != "gemma" and gemma else None,
        layer_types=_layer_types(hf_config, model_type, num_layers),
        **_global_and_local_rope(hf_config, model_type),
        **_moe(hf_config, model_type),
    )
