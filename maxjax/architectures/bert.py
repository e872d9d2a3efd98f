"""BERT-family sentence encoder: pure JAX math over an explicit param pytree.

``encode(params, cfg, token_ids, lengths)`` runs the BERT encoder (post-LayerNorm blocks, exact erf GELU)
over a right-padded batch and pools each row into one sentence vector the way the model's
sentence-transformers configuration asks (mean / CLS / max / mean-sqrt-len, then optional L2
normalisation), so the output equals ``SentenceTransformer.encode`` on the same weights.

Param pytree (float32; layers stacked on a leading ``L`` axis so one ``lax.scan`` body is compiled):

    {"embeddings": {"word": [V, D], "position": [P, D], "token_type": [S, D],
                    "ln_scale": [D], "ln_bias": [D]},
     "layers": {"qkv_w": [L, D, 3D], "qkv_b": [L, 3D],
                "attn_out_w": [L, D, D], "attn_out_b": [L, D], "attn_ln_scale": [L, D], "attn_ln_bias": [L, D],
                "mlp_in_w": [L, D, F], "mlp_in_b": [L, F], "mlp_out_w": [L, F, D], "mlp_out_b": [L, D],
                "mlp_ln_scale": [L, D], "mlp_ln_bias": [L, D]}}

Weights are stored input-major (``x @ w``), i.e. transposed from the torch ``Linear`` layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Params = dict[str, Any]

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Matmuls run at full float32 precision: on GPUs the default would use TF32 and lose the
# 1e-5 agreement with the torch reference that sentence embeddings are checked against.
_PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Static description of a BERT sentence encoder (hashable: passed to jit as static)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # Sentence-transformers head: how token vectors become one vector.
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if not 2 <= self.max_seq_length <= self.max_position_embeddings:
            raise ValueError(f"max_seq_length must be in [2, max_position_embeddings={self.max_position_embeddings}],"
                             f" got {self.max_seq_length}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any], **overrides: Any) -> "BertConfig":
        """Build from a HF ``config.json`` dict; ``overrides`` set the pooling head fields."""
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"config.position_embedding_type {position_type!r} is not supported (only 'absolute')")
        try:
            fields = dict(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                hidden_act=str(config.get("hidden_act", "gelu")),
                pad_token_id=int(config.get("pad_token_id") or 0),
            )
        except KeyError as err:
            raise ValueError(f"config.json lacks the field {err.args[0]!r} needed for a BERT model") from None
        fields["max_seq_length"] = fields["max_position_embeddings"]
        fields.update(overrides)
        return cls(**fields)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * scale + bias


def activation(x: jax.Array, name: str) -> jax.Array:
    if name == "gelu":  # HF "gelu" is the exact erf form
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


def _dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("btd,df->btf", x, w, precision=_PRECISION) + b


def embed(params: Params, cfg: BertConfig, token_ids: jax.Array) -> jax.Array:
    """Word + absolute position + token-type(0) embeddings, then LayerNorm."""
    emb = params["embeddings"]
    seq_len = token_ids.shape[1]
    x = jnp.take(emb["word"], token_ids, axis=0)  # [B, T, D]
    x = x + emb["position"][:seq_len][None] + emb["token_type"][0][None, None]  # [B, T, D]
    return layer_norm(x, emb["ln_scale"], emb["ln_bias"], cfg.layer_norm_eps)


def attention(layer: Params, cfg: BertConfig, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Bidirectional multi-head self-attention; padded keys get no weight."""
    batch, seq_len, _ = x.shape
    qkv = _dense(x, layer["qkv_w"], layer["qkv_b"])  # [B, T, 3D]
    qkv = qkv.reshape(batch, seq_len, 3, cfg.num_heads, cfg.head_dim)  # [B, T, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, H, Dh]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_PRECISION) / math.sqrt(cfg.head_dim)  # [B, H, T, T]
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, H, T, T]
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_PRECISION)  # [B, T, H, Dh]
    return _dense(ctx.reshape(batch, seq_len, cfg.hidden_size), layer["attn_out_w"], layer["attn_out_b"])


def encoder_layer(layer: Params, cfg: BertConfig, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """One post-LayerNorm BERT block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
    x = layer_norm(x + attention(layer, cfg, x, key_mask), layer["attn_ln_scale"], layer["attn_ln_bias"],
                   cfg.layer_norm_eps)  # [B, T, D]
    hidden = activation(_dense(x, layer["mlp_in_w"], layer["mlp_in_b"]), cfg.hidden_act)  # [B, T, F]
    out = _dense(hidden, layer["mlp_out_w"], layer["mlp_out_b"])  # [B, T, D]
    return layer_norm(x + out, layer["mlp_ln_scale"], layer["mlp_ln_bias"], cfg.layer_norm_eps)


def token_states(params: Params, cfg: BertConfig, token_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """Last hidden states ``[B, T, D]`` of the encoder (rows padded past ``lengths``)."""
    seq_len = token_ids.shape[1]
    key_mask = jnp.arange(seq_len)[None, :] < lengths[:, None]  # [B, T]
    x = embed(params, cfg, token_ids)  # [B, T, D]

    def body(h, layer):
        return encoder_layer(layer, cfg, h, key_mask), None

    x, _ = lax.scan(body, x, params["layers"])
    return x


def pool(cfg: BertConfig, states: jax.Array, lengths: jax.Array) -> jax.Array:
    """Sentence vectors ``[B, D]`` from token states, as sentence-transformers' Pooling/Normalize do."""
    seq_len = states.shape[1]
    mask = (jnp.arange(seq_len)[None, :] < lengths[:, None])[..., None]  # [B, T, 1]
    count = jnp.maximum(lengths.astype(states.dtype), 1e-9)[:, None]  # [B, 1]
    if cfg.pooling == "cls":
        out = states[:, 0]  # [B, D]
    elif cfg.pooling == "max":
        out = jnp.max(jnp.where(mask, states, -1e9), axis=1)  # [B, D]
    elif cfg.pooling == "mean_sqrt_len":
        out = jnp.sum(states * mask, axis=1) / jnp.sqrt(count)  # [B, D]
    else:
        out = jnp.sum(states * mask, axis=1) / count  # [B, D]
    if cfg.normalize:
        norm = jnp.linalg.norm(out, axis=-1, keepdims=True)  # [B, 1]
        out = out / jnp.maximum(norm, 1e-12)
    return out


def encode(params: Params, cfg: BertConfig, token_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """Sentence embeddings ``[B, D]`` float32 for right-padded ``token_ids [B, T]`` with true ``lengths [B]``.

    Rows with length 0 (batch padding) produce finite garbage that callers drop.
    """
    if token_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"token_ids length {token_ids.shape[1]} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    states = token_states(params, cfg, token_ids.astype(jnp.int32), lengths.astype(jnp.int32))
    return pool(cfg, states, lengths.astype(jnp.int32)).astype(jnp.float32)


def init_params(cfg: BertConfig, seed: int = 0, scale: float = 0.2) -> Params:
    """Random float32 params with the layout ``encode`` expects (for tests and tiny configs)."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    shapes = {
        "embeddings": {"word": (cfg.vocab_size, d), "position": (cfg.max_position_embeddings, d),
                       "token_type": (cfg.type_vocab_size, d), "ln_scale": (d,), "ln_bias": (d,)},
        "layers": {"qkv_w": (n, d, 3 * d), "qkv_b": (n, 3 * d), "attn_out_w": (n, d, d), "attn_out_b": (n, d),
                   "attn_ln_scale": (n, d), "attn_ln_bias": (n, d), "mlp_in_w": (n, d, f), "mlp_in_b": (n, f),
                   "mlp_out_w": (n, f, d), "mlp_out_b": (n, d), "mlp_ln_scale": (n, d), "mlp_ln_bias": (n, d)},
    }
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    for group, names in (("embeddings", ("ln_scale",)), ("layers", ("attn_ln_scale", "mlp_ln_scale"))):
        for name in names:
            params[group][name] += 1.0
    return params
