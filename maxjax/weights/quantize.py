"""Weight-only int8 quantization of a Llama param pytree (load time, numpy in, numpy out).

Every linear weight becomes ``{"int8": [.., C, O/C, D], "scale": [.., O]}`` (see
``maxjax.architectures.quantized``): symmetric, one float32 scale per output channel, so the dequantized
weight differs from the float one by at most half a step (``absmax / 254``) per entry. The embedding is
quantized per row (its rows are the output channels of a tied output projection). Norms stay float.
Q/K/V and gate/up are fused first, so each fused matrix has one chunk layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxjax.architectures import llama
from maxjax.architectures.quantized import is_quantized, quantize_int8

QUANTIZE_METHODS = (None, "int8", "gguf")  # "gguf": kept by the GGUF loader, nothing to do here


def check_quantize(quantize: Any) -> None:
    if quantize not in QUANTIZE_METHODS:
        raise ValueError(f"quantize must be one of {QUANTIZE_METHODS}, got {quantize!r}")


def quantize_params(params: dict, quantize: str | None = "int8") -> dict:
    """``params`` (stacked or unstacked layers, float numpy or jax arrays) with int8 linear weights."""
    check_quantize(quantize)
    if quantize in (None, "gguf"):
        return params
    params = llama.fuse_projections(params)

    def layer_q(layer: dict) -> dict:
        return {k: quantize_int8(np.asarray(v)) if k in llama.LINEAR_WEIGHTS and not is_quantized(v) else v
                for k, v in layer.items()}

    layers = params["layers"]
    out = dict(params, layers=[layer_q(x) for x in layers] if isinstance(layers, (list, tuple)) else layer_q(layers))
    if not is_quantized(params["embed"]):
        out["embed"] = quantize_int8(np.asarray(params["embed"]), out_axis=-2)
    if "lm_head" in params and not is_quantized(params["lm_head"]):
        out["lm_head"] = quantize_int8(np.asarray(params["lm_head"]))
    return out


def weight_bytes(params: dict) -> int:
    """Bytes of every array in the pytree (what one batch-1 decode step reads, give or take the embedding),
    without the embedding when an output projection "lm_head" is there to read instead (a step reads B rows of it)."""
    import jax

    if "lm_head" in params:
        params = {k: v for k, v in params.items() if k != "embed"}
    return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree.leaves(params)))
