"""Rotary position embeddings (HF rotate-half layout) with the scaling schemes of the Llama-style families.

`rope_scaling` is a hashable tuple of HF's rope_scaling dict items (see `LlamaConfig`). Supported rope types:
default, linear, llama3, freq_factors (GGUF `rope_freqs.weight`) and longrope (Phi-3: short factors for
positions below `original_max_position_embeddings`, long factors from there on, cos/sin times the
attention factor). Per position, so a token's rotation never depends on how long its batch or sequence is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "freq_factors", "longrope")


def rope_type(rope_scaling: tuple | None) -> str:
    """The rope type of a frozen rope_scaling; ValueError naming the supported ones."""
    if rope_scaling is None:
        return "default"
    kind = dict(rope_scaling).get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"LlamaConfig.rope_scaling rope_type {kind!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    return kind


def _theta_powers(theta: float, dim: int) -> np.ndarray:
    """theta ** (2i / dim) [Dh/2] in float32, as HF computes it."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(theta) ** exponents).astype(np.float32)


def _llama3(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
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


def _factors(scaling: dict, key: str, size: int) -> np.ndarray:
    factors = np.asarray(scaling[key], np.float32)
    if factors.shape != (size,):
        raise ValueError(f"rope {key} has {factors.size} entries, expected {size}")
    return factors


def rope_inv_freq(theta: float, head_dim: int, rope_scaling: tuple | None, long: bool = False) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32 (`long`: longrope's long-context factors)."""
    inv_freq = (1.0 / _theta_powers(theta, head_dim)).astype(np.float32)  # [Dh/2]
    kind = rope_type(rope_scaling)
    scaling = dict(rope_scaling or ())
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "freq_factors":  # per-frequency divisors
        return (inv_freq / _factors(scaling, "factors", inv_freq.size)).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    if kind == "longrope":
        factors = _factors(scaling, "long_factor" if long else "short_factor", inv_freq.size)
        return (1.0 / (factors * _theta_powers(theta, head_dim))).astype(np.float32)
    return inv_freq


def longrope_attention_factor(scaling: dict) -> float:
    """cos/sin multiplier of longrope: given, or sqrt(1 + ln(factor) / ln(original context)) as HF derives it."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(theta: float, head_dim: int, rope_scaling: tuple | None,
                 positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] in float32 for integer positions [B, T] (rotate-half layout)."""
    def angles_for(inv_freq: np.ndarray) -> jax.Array:
        return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]

    angles = angles_for(rope_inv_freq(theta, head_dim, rope_scaling))
    factor = 1.0
    if rope_type(rope_scaling) == "longrope":
        scaling = dict(rope_scaling)
        long_angles = angles_for(rope_inv_freq(theta, head_dim, rope_scaling, long=True))
        is_long = (positions >= scaling["original_max_position_embeddings"])[..., None]  # [B, T, 1]
        angles = jnp.where(is_long, long_angles, angles)
        factor = longrope_attention_factor(scaling)
    cos, sin = _repeat_halves(jnp.cos(angles), jnp.sin(angles))  # [B, T, Dh] each
    return (cos * factor, sin * factor) if factor != 1.0 else (cos, sin)


def _repeat_halves(cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[cos, cos] and [sin, sin] [..., Dh] from cos, sin [..., Dh/2]. On the CPU as one product with a 0/1
    matrix (exact in float32, which XLA CPU dots always compute in) rather than concatenates. Why: a dot's result
    is computed once and kept, while XLA CPU fuses elementwise cos/sin into every consumer and recomputes them
    for each layer, head and attention block of a prefill (~3% of a 512-token SmolLM2 prefill's CPU time).
    Elsewhere the concatenates: a GPU dot at default precision would round them (TF32)."""
    if jax.default_backend() != "cpu":
        return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)
    half = cos.shape[-1]
    repeat = np.zeros((2 * half, 4 * half), np.float32)  # [cos | sin] -> [cos, cos | sin, sin]
    for j in range(2 * half):
        repeat[j, 2 * half * (j // half) + j % half + np.array([0, half])] = 1.0
    both = jnp.concatenate([cos, sin], axis=-1) @ jnp.asarray(repeat)  # [..., 2 Dh]
    return both[..., :2 * half], both[..., 2 * half:]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, Dh] by the angles in cos/sin [B, T, Dh] (HF rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # [B, T, heads, Dh]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
