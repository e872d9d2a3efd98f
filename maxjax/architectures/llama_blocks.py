"""The products of a Llama block (`maxjax.architectures.llama`) as pure functions: RMSNorm, the projections with
the norm before them, the residual after them and each row's LoRA update, q | k | v, the gated MLP and the routed
experts. Where a weight is panel-packed (``panels``), a projection runs as one native kernel with its norm,
residual or SwiGLU fused; everything else is XLA's ops.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maxjax.architectures import moe
from maxjax.architectures.lora import lora_delta
from maxjax.architectures.panels import is_panels, panel_matmul, silu_glu_fusable
from maxjax.architectures.quantized import is_blocks, is_quantized, linear
from maxjax.architectures.rope import apply_rope

Params = dict[str, Any]
LlamaConfig = Any  # maxjax.architectures.llama.LlamaConfig (that module imports this one)

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm computed in at least float32, result cast back to x's dtype before the weight (as HF does).

    `offset`: the scale is (offset + weight), Gemma's convention (its checkpoints store weight - 1).
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64 (parity checks)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return ((offset + weight.astype(x32.dtype)) * normed).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act=jax.nn.silu) -> jax.Array:
    """Gated MLP: (act(x @ W_gate) * (x @ W_up)) @ W_down (SwiGLU with silu, GeGLU with gelu).
    x [..., D] -> [..., D]."""
    return (act(x @ w_gate) * (x @ w_up)) @ w_down  # [..., F] -> [..., D]


def normed(x: jax.Array, norm: tuple | None) -> jax.Array:
    """x RMSNormed by ``norm`` = (weight, eps, offset), or x when None."""
    return x if norm is None else rms_norm(x, *norm)


def plus(residual: jax.Array | None, out: jax.Array) -> jax.Array:
    return out if residual is None else residual + out


def runs_natively(layer: Params, key: str, lora_index: jax.Array | None) -> bool:
    """Whether ``layer[key]``'s product is one native call with its norm, residual or SwiGLU fused: a packed
    weight with no adapter update to add."""
    return is_panels(layer[key]) and (lora_index is None or key not in layer.get("lora", {}))


def project(h: jax.Array, layer: Params, key: str, lora_index: jax.Array | None, norm: tuple | None = None,
            residual: jax.Array | None = None) -> jax.Array:
    """``h @ layer[key]``, plus each row's LoRA update when the layer carries adapters for it
    (``layer["lora"][key]``, see ``maxjax.architectures.lora``; ``lora_index`` [B] picks each row's slot);
    h RMSNormed first with ``norm`` = (weight, eps, offset), ``residual`` added after. A panel-packed weight
    without adapters runs all of it as one native kernel (``panels.panel_matmul``)."""
    if runs_natively(layer, key, lora_index):
        return panel_matmul(h, layer[key], norm, residual)
    h = normed(h, norm)
    out = linear(h, layer[key])
    lora = layer.get("lora", {}).get(key)
    if lora is not None and lora_index is not None:
        out = out + lora_delta(h, lora, lora_index).astype(out.dtype)
    return plus(residual, out)


def joined_qkv(x: jax.Array, layer: Params, cfg: LlamaConfig, lora_index: jax.Array | None,
                norm: tuple | None) -> jax.Array | None:
    """The fused projection q | k | v [B, T, (H + 2 KVH) * Dh] of x RMSNormed by ``norm`` (weights fused by
    `llama_layout.fuse_projections`), None for separate weights."""
    if "wqkv" not in layer:
        return None
    qkv = project(x, layer, "wqkv", lora_index, norm)
    return qkv + layer["bqkv"] if cfg.attention_bias else qkv


def qkv_projections(x: jax.Array, layer: Params, cfg: LlamaConfig, lora_index: jax.Array | None = None,
                    norm: tuple | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q, K, V projections [B, T, H*Dh], [B, T, KVH*Dh] x2 of x RMSNormed by ``norm``, from separate or fused
    (`llama_layout.fuse_projections`) weights."""
    qkv = joined_qkv(x, layer, cfg, lora_index, norm)
    if qkv is not None:
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return qkv[..., :q_dim], qkv[..., q_dim:q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
    h = normed(x, norm)
    q, k, v = (project(h, layer, key, lora_index) for key in ("wq", "wk", "wv"))
    if cfg.attention_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    return q, k, v


def rotated_qkv(x: jax.Array, layer: Params, cfg: LlamaConfig, cos: jax.Array, sin: jax.Array,
                 lora_index: jax.Array | None, norm: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, Dh], k and v [B, T, KVH, Dh]: the projections, q and k normed (qk_norm) and rotated."""
    B, T, _ = x.shape
    H, KVH, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = qkv_projections(x, layer, cfg, lora_index, norm)
    q, k = q.reshape(B, T, H, Dh), k.reshape(B, T, KVH, Dh)
    if cfg.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], *norm[1:]), rms_norm(k, layer["k_norm"], *norm[1:])
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.reshape(B, T, KVH, Dh)


def gated_mlp(x: jax.Array, layer: Params, act=jax.nn.silu, lora_index: jax.Array | None = None,
              norm: tuple | None = None, residual: jax.Array | None = None) -> jax.Array:
    """Gated MLP of x RMSNormed by ``norm``, from separate or fused gate/up weights, ``residual`` added:
    [B, T, D] -> [B, T, D]. SwiGLU over a packed gate|up weight runs in the native product's epilogue."""
    if "w_gate_up" in layer:
        if act is jax.nn.silu and runs_natively(layer, "w_gate_up", lora_index) and silu_glu_fusable(
                layer["w_gate_up"]):
            hidden = panel_matmul(x, layer["w_gate_up"], norm, silu_glu=True)  # [B, T, F]
        else:
            gate_up = project(x, layer, "w_gate_up", lora_index, norm)  # [B, T, 2F]
            half = gate_up.shape[-1] // 2
            hidden = act(gate_up[..., :half]) * gate_up[..., half:]
        return project(hidden, layer, "w_down", lora_index, residual=residual)
    h = normed(x, norm)
    if "lora" in layer or any(is_quantized(layer[name]) or is_blocks(layer[name])
                              for name in ("w_gate", "w_up", "w_down")):
        gate, up = project(h, layer, "w_gate", lora_index), project(h, layer, "w_up", lora_index)
        return project(act(gate) * up, layer, "w_down", lora_index, residual=residual)
    out = mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"], act)
    return plus(residual, out)


def feed_forward(x: jax.Array, layer: Params, cfg: LlamaConfig, lora_index: jax.Array | None = None,
                 norm: tuple | None = None, residual: jax.Array | None = None) -> jax.Array:
    """The layer's feed-forward of x RMSNormed by ``norm``, ``residual`` added: the dense gated MLP, or the
    routed experts (`maxjax.architectures.moe`)."""
    act = ACTIVATIONS[cfg.hidden_act]
    if not cfg.num_experts:
        return gated_mlp(x, layer, act, lora_index, norm, residual)
    h = normed(x, norm)
    out = moe.sparse_moe(h, layer["router"], layer["e_gate"], layer["e_up"], layer["e_down"],
                         cfg.num_experts_per_tok, cfg.norm_topk_prob, act)
    return plus(residual, out)
