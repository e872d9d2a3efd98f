"""The serving layout of Llama-family params: what `runtime_params` does to a loaded param tree before the
engine compiles its programs (fused projections, unstacked layers, a transposed output projection, and on the
CPU weights packed for the native kernels). Re-exported by `maxjax.architectures.llama`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import panels
from maxjax.architectures.block_panels import pack_block_weights
from maxjax.architectures.quantized import concat_outputs, is_blocks, is_quantized

Params = dict[str, Any]

# The per-layer weights every token multiplies by (quantized by `weights.quantize`, packed by `runtime_params`).
LINEAR_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")


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
        cat = np.concatenate if isinstance(jax.tree.leaves(layer["wq"])[0], np.ndarray) else jnp.concatenate
        out = dict(layer)
        wqkv = concat_outputs([layer["wq"], layer["wk"], layer["wv"]], cat)  # None: block formats differ
        if wqkv is not None:
            for k in ("wq", "wk", "wv", "bq", "bk", "bv"):
                out.pop(k, None)
            out["wqkv"] = wqkv
            if "bq" in layer:
                out["bqkv"] = cat([layer["bq"], layer["bk"], layer["bv"]], axis=-1)
        w_gate_up = concat_outputs([layer["w_gate"], layer["w_up"]], cat) if "w_gate" in layer else None
        if w_gate_up is not None:  # None: mixture-of-experts layers have no dense MLP
            del out["w_gate"], out["w_up"]
            out["w_gate_up"] = w_gate_up
        return out

    layers = params["layers"]
    layers = [fuse(layer) for layer in layers] if isinstance(layers, (list, tuple)) else fuse(layers)
    return dict(params, layers=layers)


def untie_output(params: Params) -> Params:
    """A tied float embedding [V, D] also stored transposed as "lm_head" [D, V], which `lm_head` then uses.

    Why: XLA CPU's dot over the embedding's own layout (contracting both operands' minor dimension) is the
    slowest kernel of a decode step; the [D, V] layout runs it 1.5x faster at batch 1 (1.1-1.2x at 8-32), for one
    more copy of the embedding in memory. Only on the CPU: GPU/TPU dots take either layout at full speed, so
    there the copy would only cost memory. Quantized or block embeddings keep their own tied matmul."""
    embed = params["embed"]
    if jax.default_backend() != "cpu" or "lm_head" in params or is_quantized(embed) or is_blocks(embed):
        return params
    xp = np if isinstance(embed, np.ndarray) else jnp
    return dict(params, lm_head=xp.asarray(embed.T).copy())  # a contiguous [D, V] copy, not a view


def runtime_params(params: Params) -> Params:
    """The layout the serving engine runs: fused projections, unstacked layers (decode and prefill unroll them
    and read weights in place; a scan stacks them inside its program, a copy of the weights per call), a
    tied embedding's output projection transposed (`untie_output`), and on the CPU float32 weights and GGUF
    Q4_0/Q4_1/Q8_0 blocks packed for the native kernels (`panels.pack_linear_weights`,
    `pack_block_weights`)."""
    params = untie_output(fuse_projections(params))
    if not isinstance(params["layers"], (list, tuple)):
        params = unstack_layers(params)
    return pack_block_weights(panels.pack_linear_weights(params, LINEAR_WEIGHTS), LINEAR_WEIGHTS)
