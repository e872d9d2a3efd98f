"""Float32 weights packed into column panels for the native CPU matmul (``kernels/native/panel_matmul.cc``).

A packed weight is ``{"panels": p}`` with p float32 ``[N / 32, K, 32]``: panel j holds columns 32j .. 32j + 31
of the ``[K, N]`` weight, its K rows contiguous. Why: a decode step on the CPU is bound by reading the weights
once, and XLA CPU's dots read a ``[K, N]`` weight at 15-24 GB/s for 1-32 rows; the kernel walks one contiguous
panel at a time with 8 rows' accumulators in registers and streams it at the memory's speed (see the kernel).
Only on the CPU backend, for float32 weights whose N is a multiple of 32; everything else keeps XLA's dot.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.kernels import native

PANEL = 32
TARGET = "maxjax_panel_matmul"  # FFI target (maxjax.kernels.native.KERNELS)


def is_panels(w: Any) -> bool:
    return isinstance(w, dict) and "panels" in w


def pack(w: Any) -> dict[str, Any]:
    """[K, N] -> {"panels": [N / 32, K, 32]} (numpy stays numpy; a device array is packed on the device)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    k, n = w.shape
    panels = xp.transpose(w.reshape(k, n // PANEL, PANEL), (1, 0, 2))
    return {"panels": np.ascontiguousarray(panels) if xp is np else panels}


def unpack(w: dict[str, Any]) -> Any:
    """The [K, N] weight back (tests, and callers that need XLA's dot)."""
    p = w["panels"]
    xp = np if isinstance(p, np.ndarray) else jnp
    return xp.transpose(p, (1, 0, 2)).reshape(p.shape[1], -1)


def packable(w: Any) -> bool:
    return (not isinstance(w, dict) and getattr(w, "ndim", 0) == 2 and w.dtype == np.float32
            and w.shape[1] % PANEL == 0)


def pack_weights(params: dict[str, Any], names: tuple[str, ...], packable: Callable[[Any], bool],
                 pack: Callable[[Any], dict], output: Any) -> dict[str, Any]:
    """Params with every per-layer weight named in ``names`` that ``packable`` accepts replaced by ``pack(w)``,
    and "lm_head" by ``pack(output)`` when it is packable: the one load-time walk both native weight formats
    (float panels here, GGUF block panels) share."""
    def pack_layer(layer: dict) -> dict:
        return {k: pack(v) if k in names and packable(v) else v for k, v in layer.items()}
    out = dict(params, layers=[pack_layer(layer) for layer in params["layers"]])
    if packable(output):
        out["lm_head"] = pack(output)
    return out


def pack_linear_weights(params: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Every packable weight named in ``names`` (per layer) and the output projection "lm_head" packed, when
    the native kernel is available (CPU backend, a C++ compiler, not disabled); else params unchanged."""
    if native.ffi_target(TARGET) is None:
        return params
    return pack_weights(params, names, packable, pack, params.get("lm_head"))


def panel_matmul(x: jax.Array, w: dict[str, jax.Array], norm: tuple | None = None, residual: jax.Array | None = None,
                 silu_glu: bool = False) -> jax.Array:
    """x [..., K] @ the packed weight -> [..., N] float32, by the native kernel, with what it fuses around the
    product (each otherwise its own XLA kernel per layer): ``norm`` = (weight [K], eps, offset) RMSNorms the rows
    first as ``llama.rms_norm`` does; ``residual`` [..., N] is added to the result; ``silu_glu``: w is a fused
    gate|up weight [K, 2F] (`silu_glu_fusable`) and the result silu(x @ gate) * (x @ up) [..., F]."""
    native.ffi_target(TARGET)  # registered when the weights were packed; a no-op then
    panels = w["panels"]
    n = panels.shape[0] * PANEL // (2 if silu_glu else 1)
    rows = x.reshape(-1, panels.shape[1]).astype(jnp.float32)
    none = jnp.zeros((0,), jnp.float32)
    weight, eps, offset = (none, 0.0, 0.0) if norm is None else norm
    extra = none if residual is None else residual.reshape(-1, n).astype(jnp.float32)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(
        rows, weight.astype(jnp.float32), panels, extra, eps=np.float32(eps), offset=np.float32(offset),
        silu_glu=silu_glu)
    return out.reshape(*x.shape[:-1], n)


def silu_glu_fusable(w: Any) -> bool:
    """Whether a fused gate|up weight [K, 2F] can run as ``panel_matmul(..., silu_glu=True)``: packed, with F
    whole panels."""
    return is_panels(w) and w["panels"].shape[0] % 2 == 0
