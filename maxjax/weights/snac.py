"""SNAC decoder weights: torch state-dict names -> the `maxjax.architectures.snac` param pytree.

Weight norm (torch parametrization `parametrizations.weight.original0/1`, or the older `weight_g/weight_v`) is folded
into plain kernels here (w = g * v / ||v||, norm over every axis but 0), so the forward pass never recomputes it.
Encoder and quantizer input projections are not needed to decode and are ignored.

Checkpoints: a directory with `config.json` and `model.safetensors`. The published `pytorch_model.bin` is a pickle,
which maxjax never loads; convert it once with torch:

    python -c "import torch, safetensors.torch as st; st.save_file(torch.load('pytorch_model.bin', \
        map_location='cpu', weights_only=True), 'model.safetensors')"
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from maxjax.architectures.snac import RESIDUAL_DILATIONS, Params, SnacConfig
from maxjax.weights.files import read_json_object, read_safetensors


def _weight(state: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """The effective (weight-norm folded) torch weight of module `prefix`, as float32."""
    for g_name, v_name in (
        (f"{prefix}.parametrizations.weight.original0", f"{prefix}.parametrizations.weight.original1"),
        (f"{prefix}.weight_g", f"{prefix}.weight_v"),
    ):
        if g_name in state and v_name in state:
            g = np.asarray(state[g_name], np.float64)
            v = np.asarray(state[v_name], np.float64)
            norm = np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
            return (g * v / norm).astype(np.float32)
    if f"{prefix}.weight" in state:
        return np.asarray(state[f"{prefix}.weight"], np.float32)
    raise ValueError(f"SNAC weights: missing '{prefix}.weight' (or its weight-norm parametrization)")


def _bias(state: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    if f"{prefix}.bias" not in state:
        raise ValueError(f"SNAC weights: missing '{prefix}.bias'")
    return np.asarray(state[f"{prefix}.bias"], np.float32)


def _conv(state, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """torch Conv1d weight [C_out, C_in / g, K] -> WIO [K, C_in / g, C_out]."""
    p = {"w": np.ascontiguousarray(_weight(state, prefix).transpose(2, 1, 0))}
    if bias:
        p["b"] = _bias(state, prefix)
    return p


def _conv_transpose(state, prefix: str) -> dict[str, np.ndarray]:
    """torch ConvTranspose1d weight [C_in, C_out, K] -> [C_in, K * C_out] (tap-major columns)."""
    w = _weight(state, prefix)
    c_in, c_out, k = w.shape
    return {"w": np.ascontiguousarray(w.transpose(0, 2, 1).reshape(c_in, k * c_out)), "b": _bias(state, prefix)}


def _alpha(state, prefix: str) -> np.ndarray:
    name = f"{prefix}.alpha"
    if name not in state:
        raise ValueError(f"SNAC weights: missing '{name}'")
    return np.asarray(state[name], np.float32).reshape(-1)


def params_from_torch_state(state: Mapping[str, np.ndarray], cfg: SnacConfig) -> Params:
    """Convert a `snac.SNAC` state dict (numpy arrays keyed by torch names) into decoder params (jnp arrays)."""
    quantizer = []
    for level in range(len(cfg.vq_strides)):
        prefix = f"quantizer.quantizers.{level}"
        if f"{prefix}.codebook.weight" not in state:
            raise ValueError(f"SNAC weights: missing '{prefix}.codebook.weight'")
        quantizer.append({
            "codebook": np.asarray(state[f"{prefix}.codebook.weight"], np.float32),
            "out_proj": _conv(state, f"{prefix}.out_proj"),
        })

    # Module indices follow the nn.Sequential construction order in snac.layers.Decoder / DecoderBlock.
    decoder: dict = {}
    idx = 0
    decoder["in_conv"] = _conv(state, f"decoder.model.{idx}")
    idx += 1
    if cfg.depthwise:
        decoder["in_proj"] = _conv(state, f"decoder.model.{idx}")
        idx += 1
    blocks = []
    for _ in cfg.decoder_rates:
        prefix = f"decoder.model.{idx}.block"
        block = {"snake": _alpha(state, f"{prefix}.0"), "up": _conv_transpose(state, f"{prefix}.1")}
        sub = 2
        if cfg.noise:
            block["noise"] = _conv(state, f"{prefix}.{sub}.linear", bias=False)
            sub += 1
        block["res"] = []
        for _ in RESIDUAL_DILATIONS:
            unit = f"{prefix}.{sub}.block"
            block["res"].append({
                "snake1": _alpha(state, f"{unit}.0"), "conv1": _conv(state, f"{unit}.1"),
                "snake2": _alpha(state, f"{unit}.2"), "conv2": _conv(state, f"{unit}.3"),
            })
            sub += 1
        blocks.append(block)
        idx += 1
    decoder["blocks"] = blocks
    decoder["out_snake"] = _alpha(state, f"decoder.model.{idx}")
    decoder["out_conv"] = _conv(state, f"decoder.model.{idx + 1}")
    return jax_tree({"quantizer": quantizer, "decoder": decoder})


def jax_tree(tree):
    """Nested dicts/lists of numpy arrays -> the same structure of jnp arrays."""
    if isinstance(tree, dict):
        return {k: jax_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [jax_tree(v) for v in tree]
    return jnp.asarray(tree)


def load_snac(path: str | Path) -> tuple[Params, SnacConfig]:
    """Load a SNAC checkpoint directory (`config.json` + `model.safetensors`) -> (params, config)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path: no config.json in {path}")
    cfg = SnacConfig.from_dict(read_json_object(config_file))
    weights = path / "model.safetensors"
    if not weights.is_file():
        if (path / "pytorch_model.bin").is_file():
            raise ValueError(
                f"path: {path} has only pytorch_model.bin, a pickle that maxjax refuses to load; convert it to "
                "model.safetensors (see maxjax.weights.snac's docstring for the one-line torch command)"
            )
        raise ValueError(f"path: no model.safetensors in {path}")

    return params_from_torch_state(read_safetensors(weights), cfg), cfg


def save_params(params: Params, path: str | Path) -> None:
    """Save a converted param pytree as an orbax checkpoint at `path` (a new directory)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(path).absolute(), params)


def restore_params(path: str | Path) -> Params:
    """Restore a param pytree saved by `save_params`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(Path(path).absolute())
