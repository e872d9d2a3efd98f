"""Llama-family decoder (Llama 2/3, Mistral, Qwen2-style, SmolLM) as pure functions over a param pytree.

Params (plain nested dicts; layers stacked on a leading axis L so the forward is one `lax.scan`):

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*Dh], "wk": [L, D, KVH*Dh], "wv": [L, D, KVH*Dh],
                "bq": [L, H*Dh], "bk": [L, KVH*Dh], "bv": [L, KVH*Dh]   (only when attention_bias, e.g. Qwen2),
                "wo": [L, H*Dh, D], "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]},
     "final_norm": [D],
     "lm_head": [D, V]}                                                 (only when the embedding is untied)

Matmuls are `x @ W` with W as [in, out] (HF's weight transposed). Q and K use HF's rotate-half rope layout.

KV cache: `KVCache(k, v)`, each [L, num_slots, KVH, max_seq_len, Dh] (heads before positions, so a slot's
keys for one head are contiguous and attention reads them without a transposing copy). Row b of a batch owns
slot `slots[b]`; the token at position p writes cache index p; a position < 0 is padding and writes nothing.
Attention reads only `cache[:, slot, :, :kv_len]` and masks by position (key j visible to a query at p
iff j <= p, and j > p - sliding_window when set), so the same program serves any mix of prompt lengths and
decode steps.
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

from maxjax.architectures.lora import lora_delta
from maxjax.architectures.quantized import embed_lookup, embed_matmul, is_quantized, linear

Params = dict[str, Any]

# A large finite negative instead of -inf: a fully masked (padding) query row then gets a uniform softmax
# rather than NaN, so garbage in padding rows stays finite.
_MASK_VALUE = -1e30


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
        if self.rope_scaling is not None:
            _rope_type(self.rope_scaling)  # validates early

    @classmethod
    def from_hf(cls, hf_config: dict) -> "LlamaConfig":
        """From a transformers `config.json` dict (model_type llama, mistral or qwen2)."""
        model_type = hf_config.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"config.json model_type {model_type!r} is not a Llama-family model "
                             "(supported: llama, mistral, qwen2)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf_config:
                raise ValueError(f"config.json is missing {key!r}")
        num_heads = hf_config["num_attention_heads"]
        head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads
        # transformers >= 5 moves rope_theta / rope_scaling into `rope_parameters`.
        rope = dict(hf_config.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", None) or hf_config.get("rope_theta", 10000.0)
        scaling = hf_config.get("rope_scaling") or rope
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        rope_scaling = None if rope_type == "default" else dict(scaling, rope_type=rope_type)
        if rope_scaling is not None:
            rope_scaling.pop("type", None)
        sliding_window = hf_config.get("sliding_window")
        if model_type == "qwen2" and not hf_config.get("use_sliding_window", False):
            sliding_window = None
        return cls(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=_freeze(rope_scaling),
            max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            attention_bias=bool(hf_config.get("attention_bias", model_type == "qwen2")),
        )

    def to_hf(self) -> dict:
        """A transformers `config.json` dict (model_type llama, or mistral when a sliding window is set)."""
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


def _rope_type(rope_scaling: tuple) -> str:
    scaling = dict(rope_scaling)
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3", "freq_factors"):
        raise ValueError(f"LlamaConfig.rope_scaling rope_type {rope_type!r} is not supported "
                         "(supported: default, linear, llama3, freq_factors)")
    return rope_type


# ----------------------------------------------------------------------------------------------------------
# Parameters and cache


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (normal, std 0.02; norms near 1) for tests."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "wq": (L, D, q_dim), "wk": (L, D, kv_dim), "wv": (L, D, kv_dim), "wo": (L, q_dim, D),
        "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
    }
    if cfg.attention_bias:
        shapes.update(bq=(L, q_dim), bk=(L, kv_dim), bv=(L, kv_dim))
    keys = iter(jax.random.split(key, len(shapes) + 6))
    normal = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
    layers = {name: normal(shape) for name, shape in shapes.items()}
    layers["attn_norm"] = (1.0 + normal((L, D), 0.1)).astype(dtype)
    layers["mlp_norm"] = (1.0 + normal((L, D), 0.1)).astype(dtype)
    params = {"embed": normal((V, D)), "layers": layers, "final_norm": (1.0 + normal((D,), 0.1)).astype(dtype)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((D, V))
    return params


def unstack_layers(params: Params) -> Params:
    """Params with "layers" as a list of per-layer dicts, for which `forward` builds an unrolled program.

    Trade-off measured on XLA CPU (SmolLM2-135M, B=1 decode): the scanned program compiles in ~1 s but copies
    each layer's weights out of the stacked arrays every step (dynamic-slice before each dot), ~1.7x the step
    time; the unrolled one compiles in 6-15 s and reads weights in place.
    """
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return dict(params, layers=[jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers)])


def fuse_projections(params: Params) -> Params:
    """Q/K/V concatenated into one "wqkv" (and "bqkv") and gate/up into one "w_gate_up": a load-time transform
    (stacked or unstacked layers) that turns five matmuls per layer into three."""
    def fuse(layer: dict) -> dict:
        if "wq" not in layer:
            return layer
        cat = np.concatenate if isinstance(layer["wq"], np.ndarray) else jnp.concatenate
        out = {k: v for k, v in layer.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
        out["wqkv"] = cat([layer["wq"], layer["wk"], layer["wv"]], axis=-1)
        if "bq" in layer:
            out["bqkv"] = cat([layer["bq"], layer["bk"], layer["bv"]], axis=-1)
        out["w_gate_up"] = cat([layer["w_gate"], layer["w_up"]], axis=-1)
        return out

    layers = params["layers"]
    layers = [fuse(layer) for layer in layers] if isinstance(layers, (list, tuple)) else fuse(layers)
    return dict(params, layers=layers)


def runtime_params(params: Params) -> Params:
    """The layout the serving engine runs: fused projections, unstacked layers (decode unrolls them and reads
    weights in place; prefill stacks them inside its program and scans, which compiles fast)."""
    params = fuse_projections(params)
    if isinstance(params["layers"], (list, tuple)):
        return params
    return unstack_layers(params)


def param_shapes(cfg: LlamaConfig) -> Params:
    """The expected shape of every param, same tree as `init_params` (used by loaders to validate)."""
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


def init_kv_cache(cfg: LlamaConfig, num_slots: int, max_seq_len: int, dtype=jnp.float32) -> KVCache:
    """A zeroed cache of `num_slots` sequences of up to `max_seq_len` tokens."""
    shape = (cfg.num_layers, num_slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# ----------------------------------------------------------------------------------------------------------
# Math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in at least float32, result cast back to x's dtype before the weight (as HF does)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64 (parity checks)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32, with linear, llama3 or explicit per-frequency scaling."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)  # [Dh/2]
    if cfg.rope_scaling is None:
        return inv_freq
    scaling = dict(cfg.rope_scaling)
    rope_type = _rope_type(cfg.rope_scaling)
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "freq_factors":  # GGUF `rope_freqs.weight`: per-frequency divisors
        factors = np.asarray(scaling["factors"], np.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope freq_factors has {factors.shape[0]} entries, expected {inv_freq.shape[0]}")
        return (inv_freq / factors).astype(np.float32)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] in float32 for integer positions [B, T] (rotate-half layout)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, Dh]
    return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, Dh] by the angles in cos/sin [B, T, Dh] (HF rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # [B, T, heads, Dh]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask(positions: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    """Which cache positions each query may see: [B, T, kv_len] bool (causal by position, optional window)."""
    key_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    query_pos = positions[:, :, None]  # [B, T, 1]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask  # padding queries (position < 0) see nothing


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Dh]; k, v [B, KVH, S, Dh]; mask [B, T, S] -> [B, T, H, Dh].

    Query head h uses kv head h // (H // KVH), as HF's repeat_kv does. Scores and softmax in at least float32.
    """
    B, T, H, Dh = q.shape
    KVH = k.shape[1]
    q = q.reshape(B, T, KVH, H // KVH, Dh)  # [B, T, KVH, G, Dh]
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(score_dtype) / math.sqrt(Dh)  # [B, KVH, G, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, KVH, G, T, S]
    # Output in the operands' order, then transposed: asking XLA CPU for btkgd directly keeps a slow
    # standalone dot (measured 70 -> 56 ms per batch-32 decode step of SmolLM2-135M with this form).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)  # [B, T, KVH, G, Dh]
    return out.reshape(B, T, H, Dh)


def mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU: (silu(x @ W_gate) * (x @ W_up)) @ W_down. x [B, T, D] -> [B, T, D]."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down  # [B, T, F] -> [B, T, D]


def _write_cache(cache_kv: jax.Array, layer: jax.Array, new: jax.Array, slots: jax.Array,
                 positions: jax.Array) -> jax.Array:
    """Scatter new [B, T, KVH, Dh] into cache [L, S, KVH, M, Dh] at (layer, slots[b], :, positions[b, t]).

    Padding positions (< 0) are sent out of range and dropped.
    """
    max_seq_len = cache_kv.shape[3]
    write_pos = jnp.where(positions >= 0, positions, max_seq_len)  # [B, T]
    # Advanced indices split by the head slice: the update is indexed [B, T, KVH, Dh].
    return cache_kv.at[layer, slots[:, None], :, write_pos].set(new.astype(cache_kv.dtype), mode="drop")


def _project(h: jax.Array, layer: Params, key: str, lora_index: jax.Array | None) -> jax.Array:
    """``h @ layer[key]``, plus each row's LoRA update when the layer carries adapters for it
    (``layer["lora"][key]``, see ``maxjax.architectures.lora``; ``lora_index`` [B] picks each row's slot)."""
    out = linear(h, layer[key])
    lora = layer.get("lora", {}).get(key)
    if lora is None or lora_index is None:
        return out
    return out + lora_delta(h, lora, lora_index).astype(out.dtype)


def _qkv(h: jax.Array, layer: Params, cfg: LlamaConfig,
         lora_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q, K, V projections [B, T, H*Dh], [B, T, KVH*Dh] x2, from separate or fused (`fuse_projections`) weights."""
    if "wqkv" in layer:
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv = _project(h, layer, "wqkv", lora_index)  # [B, T, (H + 2 KVH) * Dh]
        if cfg.attention_bias:
            qkv = qkv + layer["bqkv"]
        return qkv[..., :q_dim], qkv[..., q_dim:q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
    q, k, v = (_project(h, layer, key, lora_index) for key in ("wq", "wk", "wv"))
    if cfg.attention_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    return q, k, v


def _mlp(h: jax.Array, layer: Params, lora_index: jax.Array | None = None) -> jax.Array:
    """SwiGLU from separate or fused gate/up weights: [B, T, D] -> [B, T, D]."""
    if "w_gate_up" in layer:
        gate_up = _project(h, layer, "w_gate_up", lora_index)  # [B, T, 2F]
        half = gate_up.shape[-1] // 2
        return _project(jax.nn.silu(gate_up[..., :half]) * gate_up[..., half:], layer, "w_down", lora_index)
    if "lora" in layer or any(is_quantized(layer[name]) for name in ("w_gate", "w_up", "w_down")):
        gate, up = _project(h, layer, "w_gate", lora_index), _project(h, layer, "w_up", lora_index)
        return _project(jax.nn.silu(gate) * up, layer, "w_down", lora_index)
    return mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"])


def decoder_layer(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, cache: KVCache, layer_index: jax.Array, slots: jax.Array,
                  positions: jax.Array, kv_len: int, lora_index: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """One pre-norm block: x [B, T, D] -> [B, T, D]; writes this layer's K/V into the cache, then attends.
    ``lora_index`` [B]: each row's LoRA adapter slot, when the layer carries adapters (0: the base model)."""
    B, T, _ = x.shape
    H, KVH, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)  # [B, T, D]
    q, k, v = _qkv(h, layer, cfg, lora_index)  # [B, T, H*Dh], [B, T, KVH*Dh] x2
    q = rope(q.reshape(B, T, H, Dh), cos, sin)  # [B, T, H, Dh]
    k = rope(k.reshape(B, T, KVH, Dh), cos, sin)  # [B, T, KVH, Dh]
    v = v.reshape(B, T, KVH, Dh)  # [B, T, KVH, Dh]
    cache = KVCache(k=_write_cache(cache.k, layer_index, k, slots, positions),
                    v=_write_cache(cache.v, layer_index, v, slots, positions))
    keys = cache.k[layer_index, slots, :, :kv_len].astype(x.dtype)  # [B, KVH, S, Dh]
    values = cache.v[layer_index, slots, :, :kv_len].astype(x.dtype)  # [B, KVH, S, Dh]
    attn = attention(q, keys, values, mask)  # [B, T, H, Dh]
    x = x + _project(attn.reshape(B, T, H * Dh), layer, "wo", lora_index)  # [B, T, D]
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)  # [B, T, D]
    x = x + _mlp(h, layer, lora_index)  # [B, T, D]
    return x, cache


def forward_hidden(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   slots: jax.Array, *, kv_len: int, scan: bool | None = None,
                   lora_index: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [B, T, D] for tokens/positions [B, T] (int32), and the updated cache.

    Every real token's K/V is written to `cache[:, slots[b], :, positions[b, t]]` before attention, so a prefill
    chunk sees earlier chunks. All positions must be < kv_len <= max_seq_len (kv_len is static).
    `scan`: one scanned layer body (True) or an unrolled program (False); None follows the params' layout
    (stacked: scan, a list from `unstack_layers`: unrolled). Unstacked layers are stacked inside the program
    when scanned. `lora_index` [B] int32: each row's LoRA adapter slot (layers carry them as "lora", see
    `maxjax.architectures.lora`); None or adapter-free layers: the base model.
    """
    if kv_len > cache.k.shape[3]:
        raise ValueError(f"kv_len ({kv_len}) exceeds the cache's max_seq_len ({cache.k.shape[3]})")
    dtype = params["final_norm"].dtype
    tokens, positions, slots = tokens.astype(jnp.int32), positions.astype(jnp.int32), slots.astype(jnp.int32)
    x = embed_lookup(params["embed"], tokens, dtype)  # [B, T, D]
    cos, sin = rope_cos_sin(cfg, positions)  # [B, T, Dh] each
    mask = attention_mask(positions, kv_len, cfg.sliding_window)  # [B, T, S]
    layers = params["layers"]
    unstacked = isinstance(layers, (list, tuple))
    if scan is None:
        scan = not unstacked

    if not scan:
        for layer_index in range(cfg.num_layers):
            layer = layers[layer_index] if unstacked else jax.tree.map(lambda a, i=layer_index: a[i], layers)
            x, cache = decoder_layer(x, layer, cfg, cos, sin, mask, cache, layer_index, slots, positions, kv_len,
                                     lora_index)
        return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache

    if unstacked:
        layers = jax.tree.map(lambda *a: jnp.stack(a), *layers)

    def body(carry, scanned):
        x, cache = carry
        layer, layer_index = scanned
        x, cache = decoder_layer(x, layer, cfg, cos, sin, mask, cache, layer_index, slots, positions, kv_len,
                                 lora_index)
        return (x.astype(dtype), cache), None

    layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, layer_indices))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache  # [B, T, D]


def lm_head(params: Params, cfg: LlamaConfig, hidden: jax.Array) -> jax.Array:
    """Logits [..., V] in float32 from hidden states [..., D] (tied: the embedding matrix transposed)."""
    if cfg.tie_word_embeddings:
        return embed_matmul(hidden, params["embed"]).astype(jnp.float32)
    return linear(hidden, params["lm_head"]).astype(jnp.float32)


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            slots: jax.Array, *, kv_len: int) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] float32 and the updated cache (see `forward_hidden`)."""
    hidden, cache = forward_hidden(params, cfg, tokens, positions, cache, slots, kv_len=kv_len)
    return lm_head(params, cfg, hidden), cache
