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

KV cache: `KVCache(k, v)`, each a pool of pages [L, num_pages, KVH, page_size, Dh] (heads before positions, so a
page's keys for one head are contiguous and attention reads them without a transposing copy). Row b of a batch
has the block table `pages[b]` [P]: the token at position p lives on page `pages[b, p // page_size]` at offset
`p % page_size` (`maxjax.kernels.paged`; a 1-D `pages` [B] is one page per row, the layout of one slot of
max_seq_len per sequence); a position < 0 is padding and writes nothing.
Attention reads only positions < kv_len of a row's pages and masks by position (key j visible to a query at p
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

from maxjax.architectures.attention import (attention, attention_mask, chunk_attention_in_place,
                                            chunk_reads_cache_in_place, decode_attention_in_place, hide_current,
                                            pallas_chunk_attention, pallas_decode_attention, pallas_serves,
                                            reads_cache_in_place, softcap, visible_keys, with_new_key, write_pages,
                                            write_pages_layers, write_projection_in_place)
from maxjax.architectures.llama_blocks import (ACTIVATIONS, feed_forward, joined_qkv, mlp,  # noqa: F401
                                               project, rms_norm, rotated_qkv)
from maxjax.architectures.llama_layout import (LINEAR_WEIGHTS, fuse_projections, runtime_params,  # noqa: F401
                                               unstack_layers, untie_output)
from maxjax.architectures.quantized import embed_lookup, embed_matmul, linear
from maxjax.architectures.rope import rope_cos_sin as _rope_cos_sin, rope_inv_freq as _rope_inv_freq
from maxjax.architectures.rope import rope_type as _rope_type
from maxjax.kernels.paged import block_table

Params = dict[str, Any]

class KVCache(NamedTuple):
    """Per-layer keys and values, pages [L, num_pages, KVH, page_size, Dh] each."""

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


def init_kv_cache(cfg: LlamaConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
    """A zeroed pool of `num_pages` pages of `page_size` positions (`num_pages` slots of `max_seq_len` positions,
    addressed by a 1-D `pages`, is the unpaged layout)."""
    shape = (cfg.num_layers, num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# ----------------------------------------------------------------------------------------------------------
# Math


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32 of the global layers (see `maxjax.architectures.rope`)."""
    return _rope_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] in float32 for integer positions [B, T] (`local`: of the sliding layers)."""
    if local and cfg.rope_local_theta is not None:
        return _rope_cos_sin(cfg.rope_local_theta, cfg.head_dim, None, positions)
    return _rope_cos_sin(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling, positions)



def _decode_attention(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                      mask: jax.Array, cache: KVCache, layer_index: int, pages: jax.Array, positions: jax.Array,
                      lora_index: jax.Array | None, norm: tuple, scale: float | None):
    """A deferred-write decode step's attention by the native kernel, from the fused projection as it comes
    (rotated in the kernel), or from the rotated projections joined (`_native_projections`: the kernel reads
    the new k and v from the row too). -> (attention [B, 1, H, Dh], the new k and v [B, 1, KVH, Dh])."""
    qkv, rotation, k, v = _native_projections(x, layer, cfg, cos, sin, lora_index, norm)
    if rotation is None:
        qkv = jnp.concatenate([a.reshape(*x.shape[:2], -1) for a in (qkv, k, v)], axis=-1)
    return decode_attention_in_place(qkv, cache.k, cache.v, layer_index, pages, positions, mask, rotation, scale,
                                     cfg.attn_logit_softcap)


def decoder_layer(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, cache: KVCache, layer_index: jax.Array, pages: jax.Array,
                  positions: jax.Array, kv_len: int, lora_index: jax.Array | None = None,
                  defer_write: bool = False, end_aligned: bool = False, every_query: jax.Array | None = None
                  ) -> tuple[jax.Array, KVCache, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm block: x [B, T, D] -> [B, T, D]; writes this layer's K/V into the cache, then attends.
    ``lora_index`` [B]: each row's LoRA adapter slot, when the layer carries adapters (0: the base model).
    ``defer_write`` (decode, T = 1; ``mask`` from `hide_current`): the cache is left as it is, the new key is
    attended to beside it, and (k, v) [B, T, KVH, Dh] are returned for the caller to write; otherwise None.
    ``every_query`` (a bool []): when false, attention and the MLP run for each row's last position only (the
    other positions keep x), while every position's K/V is still written: see `forward_hidden`."""
    B, T, _ = x.shape
    eps, offset = cfg.rms_norm_eps, cfg.norm_offset
    norm = (layer["attn_norm"], eps, offset)
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    if defer_write and pallas_serves(layer_index):  # GPU: the Pallas kernel reads the row's pages only
        q, k, v = rotated_qkv(x, layer, cfg, cos, sin, lora_index, norm)
        attn = pallas_decode_attention(q, k, v, cache, cfg, layer_index, pages, positions, scale)
        return _block_output(x, attn.reshape(B, T, -1), layer, cfg, lora_index), cache, (k, v)
    if defer_write and isinstance(layer_index, int) and reads_cache_in_place(cache, x.dtype):
        attn, k, v = _decode_attention(x, layer, cfg, cos, sin, mask, cache, layer_index, pages, positions,
                                       lora_index, norm, scale)  # [B, 1, H, Dh], [B, 1, KVH, Dh] x2
        return _block_output(x, attn.reshape(B, T, -1), layer, cfg, lora_index), cache, (k, v)
    in_place = not defer_write and chunk_reads_cache_in_place(cache, x.dtype, cfg, layer_index, T, kv_len,
                                                              cfg.attn_logit_softcap)
    if in_place:  # q [B, T, >= H * Dh] with its rotation, or rotated
        q, rotation, k, v = _native_projections(x, layer, cfg, cos, sin, lora_index, norm)
    else:
        (q, k, v), rotation = rotated_qkv(x, layer, cfg, cos, sin, lora_index, norm), None
    if not defer_write and rotation is not None:  # the fused projection: k and v go from it into the cache
        cache = KVCache(*write_projection_in_place(cache.k, cache.v, layer_index, q, rotation, pages, positions))
    elif not defer_write:
        cache = KVCache(k=write_pages(cache.k, layer_index, k, pages, positions),
                        v=write_pages(cache.v, layer_index, v, pages, positions))
    if in_place:
        def attention_of(q, rotation, mask, positions):
            return chunk_attention_in_place(q, cache.k, cache.v, layer_index, pages, mask, rotation, scale,
                                            cfg.num_heads)
    elif not defer_write and pallas_serves(layer_index):
        def attention_of(q, rotation, mask, positions):
            return pallas_chunk_attention(q, cache, cfg, layer_index, pages, positions, scale)
    else:
        keys, values, mask = visible_keys(cache, cfg, layer_index, pages, positions, mask, kv_len)
        if defer_write:
            keys, values, mask = with_new_key(keys, values, mask, positions, k, v)  # [B, KVH, S + 1, Dh]
        keys, values = keys.astype(x.dtype), values.astype(x.dtype)  # [B, KVH, S or window span, Dh]
        causal = end_aligned and not defer_write and keys.shape[2] == kv_len  # not a window's gathered keys

        def attention_of(q, rotation, mask, positions):
            return attention(q, keys, values, mask, scale, cfg.attn_logit_softcap, end_aligned=causal)

    def attend(x, q, rotation, mask, positions):  # [B, t, D], [B, t, ...], ([B, t, Dh] x2 or None), [B, t, S]
        attn = attention_of(q, rotation, mask, positions)
        return _block_output(x, attn.reshape(*x.shape[:2], -1), layer, cfg, lora_index)  # [B, t, D]

    if every_query is None:
        x = attend(x, q, rotation, mask, positions)
    else:
        def last_query(x, q, rotation, mask, positions):
            last = jax.tree.map(lambda a: a[:, -1:], (x, q, rotation, mask, positions))
            return x.at[:, -1:].set(attend(*last))

        x = jax.lax.cond(every_query, attend, last_query, x, q, rotation, mask, positions)
    return x, cache, ((k, v) if defer_write else None)


def _native_projections(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                        lora_index: jax.Array | None, norm: tuple):
    """The projections the native kernels take: (q, its rotation, k, v). Either the fused projection as it
    comes [B, T, (H + 2 KVH) Dh] with rotation (cos, sin), which the kernels apply as they read it (k and v are
    None: the kernels read them from it too); or, from separate weights or with q/k norms (they come before the
    rotation), q rotated [B, T, H * Dh] with rotation None, and k rotated and v [B, T, KVH, Dh]."""
    B, T, _ = x.shape
    qkv = None if cfg.qk_norm else joined_qkv(x, layer, cfg, lora_index, norm)
    if qkv is None:
        q, k, v = rotated_qkv(x, layer, cfg, cos, sin, lora_index, norm)
        return q.reshape(B, T, -1), None, k, v
    return qkv, (cos, sin), None, None


def _block_output(x: jax.Array, attn: jax.Array, layer: Params, cfg: LlamaConfig,
                  lora_index: jax.Array | None) -> jax.Array:
    """x [B, T, D] after its attention output attn [B, T, H * Dh]: the output projection and the MLP, each with
    its residual add (fused into the products when they run natively)."""
    eps, offset = cfg.rms_norm_eps, cfg.norm_offset
    mlp_norm = (layer["mlp_norm"], eps, offset)
    if cfg.post_norms:  # Gemma: the block's output normed before the residual add
        x = x + rms_norm(project(attn, layer, "wo", lora_index), layer["post_attn_norm"], eps, offset)
        return x + rms_norm(feed_forward(x, layer, cfg, lora_index, mlp_norm), layer["post_mlp_norm"], eps, offset)
    x = project(attn, layer, "wo", lora_index, residual=x)
    return feed_forward(x, layer, cfg, lora_index, mlp_norm, residual=x)


def forward_hidden(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   pages: jax.Array, *, kv_len: int, scan: bool | None = None,
                   lora_index: jax.Array | None = None, defer_write: bool = False, end_aligned: bool = False,
                   every_query: jax.Array | None = None):
    """Final-normed hidden states [B, T, D] for tokens/positions [B, T] (int32), and the updated cache.

    Every real token's K/V is written to its page (`pages` [B, P], or [B]: see the module docstring) before attention, so a prefill
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
    `every_query` (prefill, unrolled; a bool []): when false, the last layer attends and runs its MLP for each
    row's last position only (its K/V are still written for all), and only `hidden[:, -1]` is the model's: a
    prefill samples from the last position alone, and the rest of that layer was ~3% of a 512-token prefill.
    Pass true where every position's hidden state is read (an echo of the prompt's log-probabilities).
    """
    pages = block_table(pages)
    if kv_len > pages.shape[1] * cache.k.shape[3]:
        raise ValueError(f"kv_len ({kv_len}) exceeds the {pages.shape[1]} pages of {cache.k.shape[3]} positions "
                         "each row's block table holds")
    dtype = params["final_norm"].dtype
    tokens, positions = tokens.astype(jnp.int32), positions.astype(jnp.int32)
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
            last = layer_index == cfg.num_layers - 1
            x, cache, kv = decoder_layer(x, layer, cfg, cos, sin, mask, cache, layer_index, pages, positions,
                                         kv_len, lora_index, defer_write=defer_write, end_aligned=end_aligned,
                                         every_query=every_query if last else None)
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
        x, cache, _ = decoder_layer(x, layer, cfg, cos, sin, mask, cache, layer_index, pages, positions, kv_len,
                                    lora_index, end_aligned=end_aligned)
        return (x.astype(dtype), cache), None

    layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, layer_indices, jnp.asarray(local_layers)))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset), cache  # [B, T, D]


def write_new_kv(cache: KVCache, new_kv: tuple[jax.Array, jax.Array], pages: jax.Array,
                 positions: jax.Array) -> KVCache:
    """Stores the (k, v) [L, B, T, KVH, Dh] that `forward_hidden(..., defer_write=True)` returned for
    positions [B, T] of rows with block tables `pages` (positions < 0 write nothing)."""
    return KVCache(k=write_pages_layers(cache.k, new_kv[0], pages, positions),
                   v=write_pages_layers(cache.v, new_kv[1], pages, positions))


def lm_head(params: Params, cfg: LlamaConfig, hidden: jax.Array) -> jax.Array:
    """Logits [..., V] in float32 from hidden states [..., D] (tied: the embedding matrix transposed, or its
    transposed copy "lm_head" when `untie_output` made one)."""
    if cfg.tie_word_embeddings and "lm_head" not in params:
        logits = embed_matmul(hidden, params["embed"]).astype(jnp.float32)
    else:
        logits = linear(hidden, params["lm_head"]).astype(jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            pages: jax.Array, *, kv_len: int) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] float32 and the updated cache (see `forward_hidden`)."""
    hidden, cache = forward_hidden(params, cfg, tokens, positions, cache, pages, kv_len=kv_len)
    return lm_head(params, cfg, hidden), cache
