"""Llama-family decoder as pure functions over a param pytree: Llama 2/3, Mistral, Qwen2/3, SmolLM, Gemma 1/2/3
text, Phi-3, Qwen3-MoE and Mixtral are switches of one `LlamaConfig` (which family sets which: `families.py`).

Params (plain nested dicts; layers stacked on a leading axis L so the forward is one `lax.scan`):

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*Dh], "wk": [L, D, KVH*Dh], "wv": [L, D, KVH*Dh],
                "bq": [L, H*Dh], "bk": [L, KVH*Dh], "bv": [L, KVH*Dh]   (only when attention_bias, e.g. Qwen2),
                "wo": [L, H*Dh, D], "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D],
                "q_norm": [L, Dh], "k_norm": [L, Dh]                        (only when qk_norm: Qwen3, Gemma 3),
                "post_attn_norm": [L, D], "post_mlp_norm": [L, D]             (only when post_norms: Gemma 2/3),
                "router": [L, D, E], "e_gate": [L, E, D, Fe], "e_up": [L, E, D, Fe], "e_down": [L, E, Fe, D]
                                                                   (instead of w_gate/w_up/w_down when num_experts)},
     "final_norm": [D],
     "lm_head": [D, V]}                                                 (only when the embedding is untied)

Matmuls are `x @ W` with W as [in, out] (HF's weight transposed). Q and K use HF's rotate-half rope layout.

KV cache: `KVCache(k, v)`, each [L, num_slots, KVH, max_seq_len, Dh] (heads before positions, so a slot's
keys for one head are contiguous and attention reads them without a transposing copy). Row b of a batch owns
slot `slots[b]`; the token at position p writes cache index p; a position < 0 is padding and writes nothing.
Attention reads only `cache[:, slot, :, :kv_len]` and masks by position (key j visible to a query at p
iff j <= p, and j > p - sliding_window on sliding layers), so the same program serves any mix of prompt lengths
and decode steps. Sliding layers are every layer when `layer_types` is None (Mistral), else the ones it marks
"sliding_attention" (Gemma 2/3 alternate local and global layers).
The whole cache is carried through the layer scan and updated at the layer index, so a donated cache is
updated in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import moe
from maxjax.architectures.attention import (attention, attention_mask, decode_attention_in_place, hide_current,
                                            reads_cache_in_place, softcap, visible_keys,
                                            with_new_key, write_cache, write_cache_layers)
from maxjax.architectures.llama_layout import (LINEAR_WEIGHTS, fuse_projections, runtime_params,  # noqa: F401
                                               unstack_layers, untie_output)
from maxjax.architectures.lora import lora_delta
from maxjax.architectures.panels import is_panels, panel_matmul, silu_glu_fusable
from maxjax.architectures.quantized import embed_lookup, embed_matmul, is_blocks, is_quantized, linear
from maxjax.architectures.rope import apply_rope, rope_cos_sin as _rope_cos_sin, rope_inv_freq as _rope_inv_freq
from maxjax.architectures.rope import rope_type as _rope_type

Params = dict[str, Any]

class KVCache(NamedTuple):
    """Per-layer keys and values, [L, num_slots, max_seq_len, KVH, Dh] each."""

    k: jax.Array
    v: jax.Array


def _freeze(value: Any) -> Any:
    """A hashable form of a (nested) rope_scaling dict: sorted tuples of (key, value)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static shape and math options of a Llama-family model; hashable, so jit takes it as a static argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of HF's rope_scaling dict, or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False  # biases on the Q/K/V projections (Qwen2)
    # Family switches; the defaults are Llama's.
    hidden_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma stores weight - 1
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    qk_norm: bool = False  # RMSNorm over each head of Q and K before rope (Qwen3, Gemma 3)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add (Gemma 2/3)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power instead of head_dim's (Gemma 2/3)
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" / "full_attention"
    rope_local_theta: float | None = None  # rope base of sliding layers, unscaled (Gemma 3); None: as global ones
    num_experts: int = 0  # > 0: a top-k routed mixture of experts replaces the MLP (Qwen3-MoE, Mixtral)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"LlamaConfig.sliding_window must be positive or None, got {self.sliding_window}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if len(self.layer_types) != self.num_layers or bad:
                raise ValueError(f"LlamaConfig.layer_types must name 'sliding_attention' or 'full_attention' for "
                                 f"each of the {self.num_layers} layers, got {self.layer_types!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig.hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"LlamaConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.rope_scaling is not None:
            _rope_type(self.rope_scaling)  # validates early

    @classmethod
    def from_hf(cls, hf_config: dict) -> "LlamaConfig":
        """From a transformers `config.json` dict of any supported family (see `families.config_from_hf`)."""
        from maxjax.architectures.families import config_from_hf

        return config_from_hf(hf_config)

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends within `sliding_window` (all layers when layer_types is None)."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def to_hf(self) -> dict:
        """A transformers `config.json` dict (model_type llama, or mistral when a sliding window is set)."""
        llama_like = LlamaConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                    if f.name in _LLAMA_FIELDS})
        if llama_like != self:
            raise ValueError("LlamaConfig.to_hf writes Llama/Mistral configs; this config sets family switches")
        rope_scaling = None if self.rope_scaling is None else {k: _thaw(v) for k, v in self.rope_scaling}
        config = {
            "architectures": ["MistralForCausalLM" if self.sliding_window else "LlamaForCausalLM"],
            "model_type": "mistral" if self.sliding_window else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
        }
        if self.sliding_window:
            config["sliding_window"] = self.sliding_window
        return config


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# The fields a plain Llama / Mistral config.json expresses (the rest are family switches).
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
                 "tie_word_embeddings", "sliding_window", "attention_bias")

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


# ----------------------------------------------------------------------------------------------------------
# Parameters and cache


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (normal, std 0.02; norms near 1) for tests."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"wq": (L, D, q_dim), "wk": (L, D, kv_dim), "wv": (L, D, kv_dim), "wo": (L, q_dim, D)}
    if cfg.num_experts:
        E, Fe = cfg.num_experts, cfg.moe_intermediate_size
        shapes.update(router=(L, D, E), e_gate=(L, E, D, Fe), e_up=(L, E, D, Fe), e_down=(L, E, Fe, D))
    else:
        shapes.update(w_gate=(L, D, F), w_up=(L, D, F), w_down=(L, F, D))
    if cfg.attention_bias:
        shapes.update(bq=(L, q_dim), bk=(L, kv_dim), bv=(L, kv_dim))
    norms = {"attn_norm": (L, D), "mlp_norm": (L, D)}
    if cfg.qk_norm:
        norms.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    if cfg.post_norms:
        norms.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    keys = iter(jax.random.split(key, len(shapes) + len(norms) + 3))
    normal = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
    norm = lambda shape: (1.0 - cfg.norm_offset + normal(shape, 0.1)).astype(dtype)  # noqa: E731  scale near 1
    layers = {name: normal(shape) for name, shape in shapes.items()}
    layers.update({name: norm(shape) for name, shape in norms.items()})
    params = {"embed": normal((V, D)), "layers": layers, "final_norm": norm((D,))}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((D, V))
    return params


def param_shapes(cfg: LlamaConfig) -> Params:
    """The expected shape of every param, same tree as `init_params` (used by loaders to validate)."""
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


def init_kv_cache(cfg: LlamaConfig, num_slots: int, max_seq_len: int, dtype=jnp.float32) -> KVCache:
    """A zeroed cache of `num_slots` sequences of up to `max_seq_len` tokens."""
    shape = (cfg.num_layers, num_slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# ----------------------------------------------------------------------------------------------------------
# Math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm computed in at least float32, result cast back to x's dtype before the weight (as HF does).

    `offset`: the scale is (offset + weight), Gemma's convention (its checkpoints store weight - 1).
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64 (parity checks)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return ((offset + weight.astype(x32.dtype)) * normed).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32 of the global layers (see `maxjax.architectures.rope`)."""
    return _rope_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] in float32 for integer positions [B, T] (`local`: of the sliding layers)."""
    if local and cfg.rope_local_theta is not None:
        return _rope_cos_sin(cfg.rope_local_theta, cfg.head_dim, None, positions)
    return _rope_cos_sin(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling, positions)


rope = apply_rope


def mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act=jax.nn.silu) -> jax.Array:
    """Gated MLP: (act(x @ W_gate) * (x @ W_up)) @ W_down (SwiGLU with silu, GeGLU with gelu).
    x [..., D] -> [..., D]."""
    return (act(x @ w_gate) * (x @ w_up)) @ w_down  # [..., F] -> [..., D]


def _normed(x: jax.Array, norm: tuple | None) -> jax.Array:
    """x RMSNormed by ``norm`` = (weight, eps, offset), or x when None."""
    return x if norm is None else rms_norm(x, *norm)


def _plus(residual: jax.Array | None, out: jax.Array) -> jax.Array:
    return out if residual is None else residual + out


def _runs_natively(layer: Params, key: str, lora_index: jax.Array | None) -> bool:
    """Whether ``layer[key]``'s product is one native call with its norm, residual or SwiGLU fused: a packed
    weight with no adapter update to add."""
    return is_panels(layer[key]) and (lora_index is None or key not in layer.get("lora", {}))


def _project(h: jax.Array, layer: Params, key: str, lora_index: jax.Array | None, norm: tuple | None = None,
             residual: jax.Array | None = None) -> jax.Array:
    """``h @ layer[key]``, plus each row's LoRA update when the layer carries adapters for it
    (``layer["lora"][key]``, see ``maxjax.architectures.lora``; ``lora_index`` [B] picks each row's slot);
    h RMSNormed first with ``norm`` = (weight, eps, offset), ``residual`` added after. A panel-packed weight
    without adapters runs all of it as one native kernel (``panels.panel_matmul``)."""
    if _runs_natively(layer, key, lora_index):
        return panel_matmul(h, layer[key], norm, residual)
    h = _normed(h, norm)
    out = linear(h, layer[key])
    lora = layer.get("lora", {}).get(key)
    if lora is not None and lora_index is not None:
        out = out + lora_delta(h, lora, lora_index).astype(out.dtype)
    return _plus(residual, out)


def _joined_qkv(x: jax.Array, layer: Params, cfg: LlamaConfig, lora_index: jax.Array | None,
                norm: tuple | None) -> jax.Array | None:
    """The fused projection q | k | v [B, T, (H + 2 KVH) * Dh] of x RMSNormed by ``norm`` (weights fused by
    `fuse_projections`), None for separate weights."""
    if "wqkv" not in layer:
        return None
    qkv = _project(x, layer, "wqkv", lora_index, norm)
    return qkv + layer["bqkv"] if cfg.attention_bias else qkv


def _qkv(x: jax.Array, layer: Params, cfg: LlamaConfig, lora_index: jax.Array | None = None,
         norm: tuple | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q, K, V projections [B, T, H*Dh], [B, T, KVH*Dh] x2 of x RMSNormed by ``norm``, from separate or fused
    (`fuse_projections`) weights."""
    qkv = _joined_qkv(x, layer, cfg, lora_index, norm)
    if qkv is not None:
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return qkv[..., :q_dim], qkv[..., q_dim:q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
    h = _normed(x, norm)
    q, k, v = (_project(h, layer, key, lora_index) for key in ("wq", "wk", "wv"))
    if cfg.attention_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    return q, k, v


def _rotated_qkv(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                 lora_index: jax.Array | None, norm: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, Dh], k and v [B, T, KVH, Dh]: the projections, q and k normed (qk_norm) and rotated."""
    B, T, _ = x.shape
    H, KVH, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = _qkv(x, layer, cfg, lora_index, norm)
    q, k = q.reshape(B, T, H, Dh), k.reshape(B, T, KVH, Dh)
    if cfg.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], *norm[1:]), rms_norm(k, layer["k_norm"], *norm[1:])
    return rope(q, cos, sin), rope(k, cos, sin), v.reshape(B, T, KVH, Dh)


def _decode_attention(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                      mask: jax.Array, cache: KVCache, layer_index: int, slots: jax.Array, positions: jax.Array,
                      lora_index: jax.Array | None, norm: tuple, scale: float | None):
    """A deferred-write decode step's attention by the native kernel, from the fused projection as it comes
    (rotated in the kernel), or from the rotated projections joined (separate weights, or q/k norms, which come
    before the rotation). -> (attention [B, 1, H, Dh], the new k and v [B, 1, KVH, Dh])."""
    qkv = None if cfg.qk_norm else _joined_qkv(x, layer, cfg, lora_index, norm)
    rotation = (cos, sin)
    if qkv is None:
        q, k, v = _rotated_qkv(x, layer, cfg, cos, sin, lora_index, norm)
        qkv, rotation = jnp.concatenate([a.reshape(*x.shape[:2], -1) for a in (q, k, v)], axis=-1), None
    return decode_attention_in_place(qkv, cache, layer_index, slots, positions, mask, rotation, scale,
                                     cfg.attn_logit_softcap)


def _mlp(x: jax.Array, layer: Params, act=jax.nn.silu, lora_index: jax.Array | None = None,
         norm: tuple | None = None, residual: jax.Array | None = None) -> jax.Array:
    """Gated MLP of x RMSNormed by ``norm``, from separate or fused gate/up weights, ``residual`` added:
    [B, T, D] -> [B, T, D]. SwiGLU over a packed gate|up weight runs in the native product's epilogue."""
    if "w_gate_up" in layer:
        if act is jax.nn.silu and _runs_natively(layer, "w_gate_up", lora_index) and silu_glu_fusable(
                layer["w_gate_up"]):
            hidden = panel_matmul(x, layer["w_gate_up"], norm, silu_glu=True)  # [B, T, F]
        else:
            gate_up = _project(x, layer, "w_gate_up", lora_index, norm)  # [B, T, 2F]
            half = gate_up.shape[-1] // 2
            hidden = act(gate_up[..., :half]) * gate_up[..., half:]
        return _project(hidden, layer, "w_down", lora_index, residual=residual)
    h = _normed(x, norm)
    if "lora" in layer or any(is_quantized(layer[name]) or is_blocks(layer[name])
                              for name in ("w_gate", "w_up", "w_down")):
        gate, up = _project(h, layer, "w_gate", lora_index), _project(h, layer, "w_up", lora_index)
        return _project(act(gate) * up, layer, "w_down", lora_index, residual=residual)
    out = mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"], act)
    return _plus(residual, out)


def _ffn(x: jax.Array, layer: Params, cfg: LlamaConfig, lora_index: jax.Array | None = None,
         norm: tuple | None = None, residual: jax.Array | None = None) -> jax.Array:
    """The layer's feed-forward of x RMSNormed by ``norm``, ``residual`` added: the dense gated MLP, or the
    routed experts (`maxjax.architectures.moe`)."""
    act = ACTIVATIONS[cfg.hidden_act]
    if not cfg.num_experts:
        return _mlp(x, layer, act, lora_index, norm, residual)
    h = _normed(x, norm)
    out = moe.sparse_moe(h, layer["router"], layer["e_gate"], layer["e_up"], layer["e_down"],
                         cfg.num_experts_per_tok, cfg.norm_topk_prob, act)
    return _plus(residual, out)


def decoder_layer(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, cache: KVCache, layer_index: jax.Array, slots: jax.Array,
                  positions: jax.Array, kv_len: int, lora_index: jax.Array | None = None,
                  defer_write: bool = False,
                  end_aligned: bool = False) -> tuple[jax.Array, KVCache, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm block: x [B, T, D] -> [B, T, D]; writes this layer's K/V into the cache, then attends.
    ``lora_index`` [B]: each row's LoRA adapter slot, when the layer carries adapters (0: the base model).
    ``defer_write`` (decode, T = 1; ``mask`` from `hide_current`): the cache is left as it is, the new key is
    attended to beside it, and (k, v) [B, T, KVH, Dh] are returned for the caller to write; otherwise None."""
    B, T, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    eps, offset = cfg.rms_norm_eps, cfg.norm_offset
    norm = (layer["attn_norm"], eps, offset)
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    if defer_write and isinstance(layer_index, int) and reads_cache_in_place(cache, x.dtype):
        attn, k, v = _decode_attention(x, layer, cfg, cos, sin, mask, cache, layer_index, slots, positions,
                                       lora_index, norm, scale)  # [B, 1, H, Dh], [B, 1, KVH, Dh] x2
    else:
        q, k, v = _rotated_qkv(x, layer, cfg, cos, sin, lora_index, norm)  # [B, T, H, Dh], [B, T, KVH, Dh] x2
        if not defer_write:
            cache = KVCache(k=write_cache(cache.k, layer_index, k, slots, positions),
                            v=write_cache(cache.v, layer_index, v, slots, positions))
        keys, values, mask = visible_keys(cache, cfg, layer_index, slots, positions, mask, kv_len)
        if defer_write:
            keys, values, mask = with_new_key(keys, values, mask, positions, k, v)  # [B, KVH, S + 1, Dh]
        keys, values = keys.astype(x.dtype), values.astype(x.dtype)  # [B, KVH, S or window span, Dh]
        causal = end_aligned and not defer_write and keys.shape[2] == kv_len  # not a window's gathered keys
        attn = attention(q, keys, values, mask, scale, cfg.attn_logit_softcap, end_aligned=causal)  # [B, T, H, Dh]
    attn = attn.reshape(B, T, H * Dh)
    mlp_norm = (layer["mlp_norm"], eps, offset)
    if cfg.post_norms:  # Gemma: the block's output normed before the residual add
        x = x + rms_norm(_project(attn, layer, "wo", lora_index), layer["post_attn_norm"], eps, offset)
        x = x + rms_norm(_ffn(x, layer, cfg, lora_index, mlp_norm), layer["post_mlp_norm"], eps, offset)
    else:  # [B, T, D]; the residual adds fused into the products when they run natively
        x = _project(attn, layer, "wo", lora_index, residual=x)
        x = _ffn(x, layer, cfg, lora_index, mlp_norm, residual=x)
    return x, cache, ((k, v) if defer_write else None)


def forward_hidden(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   slots: jax.Array, *, kv_len: int, scan: bool | None = None,
                   lora_index: jax.Array | None = None, defer_write: bool = False, end_aligned: bool = False):
    """Final-normed hidden states [B, T, D] for tokens/positions [B, T] (int32), and the updated cache.

    Every real token's K/V is written to `cache[:, slots[b], :, positions[b, t]]` before attention, so a prefill
    chunk sees earlier chunks. All positions must be < kv_len <= max_seq_len (kv_len is static).
    `scan`: one scanned layer body (True) or an unrolled program (False); None follows the params' layout
    (stacked: scan, a list from `unstack_layers`: unrolled). Unstacked layers are stacked inside the program
    when scanned. `lora_index` [B] int32: each row's LoRA adapter slot (layers carry them as "lora", see
    `maxjax.architectures.lora`); None or adapter-free layers: the base model.
    `defer_write` (decode: T = 1, unrolled): the cache is only read; each query attends to it and to its own new
    key, and (hidden, cache, (k, v) [L, B, T, KVH, Dh]) is returned for `write_new_kv` to store later. Why: one
    scatter per step for all layers instead of two per layer (with their index arithmetic), and the write can
    come before the next step's reads, so XLA updates the donated cache in place.
    `end_aligned` (prefill): each row's real tokens end the row (padding first) at consecutive positions below
    kv_len, so token t's position is <= kv_len - T + t: attention skips keys no query of a block sees.
    """
    if kv_len > cache.k.shape[3]:
        raise ValueError(f"kv_len ({kv_len}) exceeds the cache's max_seq_len ({cache.k.shape[3]})")
    dtype = params["final_norm"].dtype
    tokens, positions, slots = tokens.astype(jnp.int32), positions.astype(jnp.int32), slots.astype(jnp.int32)
    x = embed_lookup(params["embed"], tokens, dtype)  # [B, T, D]
    if cfg.embed_scale:  # HF rounds sqrt(D) to the activation dtype first
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    # Global and sliding ("local") layers may differ in rope base and mask: both sets are built once.
    rope_global, rope_local = rope_cos_sin(cfg, positions), rope_cos_sin(cfg, positions, local=True)  # [B, T, Dh]
    mask_global = attention_mask(positions, kv_len, None)  # [B, T, S]
    mask_local = attention_mask(positions, kv_len, cfg.sliding_window)
    local_layers = np.array([cfg.is_sliding(i) for i in range(cfg.num_layers)])
    layers = params["layers"]
    unstacked = isinstance(layers, (list, tuple))
    if scan is None:
        scan = not unstacked
    if defer_write and (scan or tokens.shape[1] != 1):
        raise ValueError("defer_write is for decode: one token per row and unrolled layers (scan=False)")

    if not scan:
        if defer_write:
            mask_global, mask_local = hide_current(mask_global, positions), hide_current(mask_local, positions)
        new_kv = []
        for layer_index in range(cfg.num_layers):
            layer = layers[layer_index] if unstacked else jax.tree.map(lambda a, i=layer_index: a[i], layers)
            local = local_layers[layer_index]
            (cos, sin), mask = (rope_local, mask_local) if local else (rope_global, mask_global)
            x, cache, kv = decoder_layer(x, layer, cfg, cos, sin, mask, cache, layer_index, slots, positions,
                                         kv_len, lora_index, defer_write=defer_write, end_aligned=end_aligned)
            new_kv.append(kv)
        hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        if defer_write:  # [L, B, T, KVH, Dh] each
            return hidden, cache, (jnp.stack([k for k, _ in new_kv]), jnp.stack([v for _, v in new_kv]))
        return hidden, cache

    if unstacked:
        layers = jax.tree.map(lambda *a: jnp.stack(a), *layers)

    def body(carry, scanned):
        x, cache = carry
        layer, layer_index, local = scanned
        cos, sin, mask = (jnp.where(local, a, b) for a, b in zip((*rope_local, mask_local),
                                                                 (*rope_global, mask_global)))
        x, cache, _ = decoder_layer(x, layer, cfg, cos, sin, mask, cache, layer_index, slots, positions, kv_len,
                                    lora_index, end_aligned=end_aligned)
        return (x.astype(dtype), cache), None

    layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, layer_indices, jnp.asarray(local_layers)))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset), cache  # [B, T, D]


def write_new_kv(cache: KVCache, new_kv: tuple[jax.Array, jax.Array], slots: jax.Array,
                 positions: jax.Array) -> KVCache:
    """Stores the (k, v) [L, B, T, KVH, Dh] that `forward_hidden(..., defer_write=True)` returned for
    positions [B, T] of rows in `slots` [B] (positions < 0 write nothing)."""
    return KVCache(k=write_cache_layers(cache.k, new_kv[0], slots, positions),
                   v=write_cache_layers(cache.v, new_kv[1], slots, positions))


def lm_head(params: Params, cfg: LlamaConfig, hidden: jax.Array) -> jax.Array:
    """Logits [..., V] in float32 from hidden states [..., D] (tied: the embedding matrix transposed, or its
    transposed copy "lm_head" when `untie_output` made one)."""
    if cfg.tie_word_embeddings and "lm_head" not in params:
        logits = embed_matmul(hidden, params["embed"]).astype(jnp.float32)
    else:
        logits = linear(hidden, params["lm_head"]).astype(jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            slots: jax.Array, *, kv_len: int) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] float32 and the updated cache (see `forward_hidden`)."""
    hidden, cache = forward_hidden(params, cfg, tokens, positions, cache, slots, kv_len=kv_len)
    return lm_head(params, cfg, hidden), cache
