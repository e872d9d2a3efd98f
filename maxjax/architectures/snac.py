"""SNAC neural audio codec decoder (codes -> waveform) as pure JAX functions over a param pytree.

Matches `snac.SNAC.decode` (hubertsiuzdak/snac 1.2.1): per-level codebook lookup and 1x1 projection summed at the
finest code rate, then a convolutional decoder of upsampling blocks with Snake activations. Activations are
channels-last (`[B, T, C]`), which XLA's CPU convolutions run faster than channels-first.

Weight norm is folded into plain weights at load time (`maxjax.weights.snac`), so the forward pass sees ordinary
conv kernels. Every convolution masks its input beyond each row's valid length, which reproduces the zero padding
torch applies at the end of a shorter sequence: a batch padded up to a bucket decodes each row exactly as if it
had been decoded alone at its true length.

Param pytree (kernels in `lax.conv` "WIO" layout `[K, C_in / groups, C_out]`):
    quantizer: [{codebook [N, D], out_proj {w [1, D, L], b [L]}} per level]
    decoder: {in_conv, in_proj?, blocks: [{snake, up {w [C_in, 2s * C_out], b}, noise?, res: [ResidualUnit] x 3}],
              out_snake, out_conv}
    ResidualUnit: {snake1, conv1 (k7, dilated, grouped), snake2, conv2 (1x1)}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

Params = dict[str, Any]

RESIDUAL_DILATIONS = (1, 3, 9)


@dataclasses.dataclass(frozen=True)
class SnacConfig:
    """Static SNAC hyper-parameters (hashable, usable as a jit static argument). Defaults: the 24 kHz model."""

    sampling_rate: int = 24000
    encoder_dim: int = 48
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int | None = None
    decoder_dim: int = 1024
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    attn_window_size: int | None = None
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: tuple[int, ...] = (4, 2, 1)
    noise: bool = True
    depthwise: bool = True

    def __post_init__(self):
        for name in ("encoder_rates", "decoder_rates", "vq_strides"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.latent_dim is None:
            object.__setattr__(self, "latent_dim", self.encoder_dim * 2 ** len(self.encoder_rates))
        if self.attn_window_size is not None:
            raise ValueError("attn_window_size: SNAC decoders with local attention (32/44 kHz models) are not supported")
        if not self.vq_strides or any(s < 1 for s in self.vq_strides):
            raise ValueError(f"vq_strides: expected positive integers, got {self.vq_strides}")
        if any(self.vq_strides[0] % s for s in self.vq_strides):
            raise ValueError(f"vq_strides: every stride must divide the coarsest {self.vq_strides[0]}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SnacConfig":
        """Build from a SNAC `config.json` dict (the keyword arguments of `snac.SNAC`); unknown keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"SNAC config: unknown keys {unknown}")
        return cls(**dict(config))

    @property
    def hop_length(self) -> int:
        """Samples per step of the finest code level."""
        return math.prod(self.encoder_rates)

    @property
    def frame_steps(self) -> int:
        """Finest-level steps per coarsest code (one Orpheus frame of 7 tokens for the 24 kHz model)."""
        return self.vq_strides[0]

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length * self.frame_steps

    def level_steps(self, num_frames: int) -> tuple[int, ...]:
        """Number of codes per level for `num_frames` coarsest codes."""
        return tuple(num_frames * self.vq_strides[0] // s for s in self.vq_strides)


# ---------------------------------------------------------------------------------------------- layers


def snake(x: jax.Array, alpha: jax.Array) -> jax.Array:
    """Snake activation x + sin²(αx)/α, per channel. x: [B, T, C], alpha: [C]."""
    return x + jnp.reciprocal(alpha + 1e-9) * jnp.square(jnp.sin(alpha * x))


def _time_mask(valid: jax.Array | None, length: int) -> jax.Array | None:
    """[B, T, 1] float mask of positions below each row's valid length (None: all valid)."""
    if valid is None:
        return None
    return (jnp.arange(length)[None, :] < valid[:, None]).astype(jnp.float32)[:, :, None]  # [B, T, 1]


def conv1d(x: jax.Array, p: Params, mask: jax.Array | None, *, dilation: int = 1, groups: int = 1) -> jax.Array:
    """'Same' 1-D convolution (odd kernel, zero padding) over [B, T, C_in] -> [B, T, C_out]."""
    w = p["w"]  # [K, C_in / groups, C_out]
    if mask is not None:
        x = x * mask
    k = w.shape[0]
    if k == 1:
        y = jnp.einsum("btc,cd->btd", x, w[0])  # [B, T, C_out]
    elif groups == x.shape[-1] == w.shape[-1]:
        y = _depthwise_conv(x, w[:, 0, :], dilation)
    else:
        pad = (k - 1) * dilation // 2
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=(1,), padding=[(pad, pad)], rhs_dilation=(dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
        )  # [B, T, C_out]
    if "b" in p:
        y = y + p["b"]
    return y


def _depthwise_conv(x: jax.Array, w: jax.Array, dilation: int) -> jax.Array:
    """Depthwise 'same' conv as a sum of shifted, per-channel-scaled copies; x: [B, T, C], w: [K, C]."""
    k, t = w.shape[0], x.shape[1]
    pad = (k - 1) * dilation // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))  # [B, T + 2 pad, C]
    y = xp[:, 0:t] * w[0]
    for i in range(1, k):
        y = y + xp[:, i * dilation : i * dilation + t] * w[i]
    return y  # [B, T, C]


def conv_transpose_upsample(x: jax.Array, p: Params, stride: int, mask: jax.Array | None) -> jax.Array:
    """torch ConvTranspose1d(kernel 2s, stride s, padding ceil(s/2), output_padding s % 2), [B, T, C] -> [B, T*s, C'].

    With kernel 2s each input step writes two adjacent output blocks of s samples, so the transposed conv is one
    matmul followed by an overlap-add of the two halves, instead of a conv over an s-times zero-dilated input.
    """
    w = p["w"]  # [C_in, 2s * C_out], columns ordered (kernel tap, out channel)
    if mask is not None:
        x = x * mask
    b, t, _ = x.shape
    c_out = w.shape[1] // (2 * stride)
    y = jnp.einsum("btc,cf->btf", x, w).reshape(b, t, 2, stride, c_out)  # [B, T, 2, s, C']
    zero = jnp.zeros((b, 1, stride, c_out), y.dtype)
    full = jnp.concatenate([y[:, :, 0], zero], axis=1) + jnp.concatenate([zero, y[:, :, 1]], axis=1)  # [B, T+1, s, C']
    full = full.reshape(b, (t + 1) * stride, c_out)  # uncropped output, length (T-1)s + 2s
    pad = math.ceil(stride / 2)
    out_len = (t - 1) * stride - 2 * pad + 2 * stride + stride % 2
    return full[:, pad : pad + out_len] + p["b"]  # [B, T*s, C']


def residual_unit(x: jax.Array, p: Params, dilation: int, groups: int, mask: jax.Array | None) -> jax.Array:
    y = conv1d(snake(x, p["snake1"]), p["conv1"], mask, dilation=dilation, groups=groups)
    y = conv1d(snake(y, p["snake2"]), p["conv2"], None)  # 1x1: pointwise, no padding to emulate
    return x + y  # [B, T, C]


def noise_block(x: jax.Array, p: Params, key: jax.Array) -> jax.Array:
    """x + n * (W x) with one standard-normal sample per (row, step), as in `snac.layers.NoiseBlock`."""
    b, t, _ = x.shape
    h = jnp.einsum("btc,cd->btd", x, p["w"][0])  # [B, T, C]
    return x + jax.random.normal(key, (b, t, 1), x.dtype) * h


# ---------------------------------------------------------------------------------------------- model


def codes_to_latent(params: Params, cfg: SnacConfig, codes: Sequence[jax.Array]) -> jax.Array:
    """Sum of per-level code embeddings at the finest rate. codes[i]: [B, n * stride_0 / stride_i] -> [B, T, L]."""
    if len(codes) != len(cfg.vq_strides):
        raise ValueError(f"codes: expected {len(cfg.vq_strides)} levels, got {len(codes)}")
    latent = None
    for level, (c, stride) in enumerate(zip(codes, cfg.vq_strides)):
        q = params["quantizer"][level]
        z = jnp.take(q["codebook"], c, axis=0)  # [B, T_i, D]
        z = jnp.einsum("btd,dl->btl", z, q["out_proj"]["w"][0]) + q["out_proj"]["b"]  # [B, T_i, L]
        if stride > 1:
            z = jnp.repeat(z, stride, axis=1)  # [B, T, L]
        latent = z if latent is None else latent + z
    return latent


def decode_latent(
    params: Params, cfg: SnacConfig, latent: jax.Array, *, valid_steps: jax.Array | None = None,
    noise_key: jax.Array | None = None,
) -> jax.Array:
    """Latent [B, T, L] -> audio [B, T * hop, 1] in [-1, 1]; valid_steps [B] masks padded steps per row."""
    dec = params["decoder"]
    t = latent.shape[1]
    mask = _time_mask(valid_steps, t)
    if cfg.depthwise:
        x = conv1d(latent, dec["in_conv"], mask, groups=cfg.latent_dim)
        x = conv1d(x, dec["in_proj"], None)  # [B, T, decoder_dim]
    else:
        x = conv1d(latent, dec["in_conv"], mask)
    keys = jax.random.split(noise_key, len(cfg.decoder_rates)) if noise_key is not None else None
    scale = 1
    for i, (stride, block) in enumerate(zip(cfg.decoder_rates, dec["blocks"])):
        x = conv_transpose_upsample(snake(x, block["snake"]), block["up"], stride, mask)  # [B, T*s, C/2]
        scale *= stride
        mask = _time_mask(None if valid_steps is None else valid_steps * scale, t * scale)
        if keys is not None and "noise" in block:
            x = noise_block(x, block["noise"], keys[i])
        groups = x.shape[-1] if cfg.depthwise else 1
        for dilation, unit in zip(RESIDUAL_DILATIONS, block["res"]):
            x = residual_unit(x, unit, dilation, groups, mask)
    x = conv1d(snake(x, dec["out_snake"]), dec["out_conv"], mask)  # [B, T * hop, 1]
    return jnp.tanh(x)


def decode(
    params: Params, cfg: SnacConfig, codes: Sequence[jax.Array], *, valid_frames: jax.Array | None = None,
    noise_key: jax.Array | None = None,
) -> jax.Array:
    """Codes (one int array per level, [B, n * stride_0 / stride_i]) -> audio [B, 1, n * samples_per_frame].

    valid_frames [B] (optional): rows shorter than n decode exactly as alone at their own length; samples past
    a row's end are meaningless. noise_key enables SNAC's NoiseBlocks (off by default, for deterministic output).
    """
    latent = codes_to_latent(params, cfg, codes)  # [B, T, L]
    valid_steps = None if valid_frames is None else valid_frames * cfg.frame_steps
    audio = decode_latent(params, cfg, latent, valid_steps=valid_steps, noise_key=noise_key)  # [B, S, 1]
    return jnp.swapaxes(audio, 1, 2)  # [B, 1, S]
