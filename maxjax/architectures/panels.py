"""Float32 weights packed into column panels for the native CPU matmul (``runtime/native/panel_matmul.cc``).

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

from maxjax.runtime import native

PANEL = 32
TARGET = "maxjax_panel_matmul"  # FFI targets (maxjax.runtime.native.KERNELS)
SILU_GLU_TARGET = "maxjax_silu_glu_matmul"


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


def _call(target: str, x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    native.ffi_target(target)  # registered when the weights were packed; a no-op then
    rows = x.reshape(-1, panels.shape[1]).astype(jnp.float32)
    out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(rows, panels)
    return out.reshape(*x.shape[:-1], n)


def panel_matmul(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    """x [..., K] @ the packed weight -> [..., N] float32, by the native kernel."""
    return _call(TARGET, x, w["panels"], w["panels"].shape[0] * PANEL)


def silu_glu_fusable(w: Any) -> bool:
    """Whether a fused gate|up weight [K, 2F] can run as `silu_glu_matmul`: packed, F whole panels."""
    return is_panels(w) and w["panels"].shape[0] % 2 == 0


def silu_glu_matmul(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    """silu(x @ gate) * (x @ up) for the packed fused gate|up weight [K, 2F] -> [..., F] float32: SwiGLU's
    activation in the native product's epilogue (no [..., 2F] intermediate, one kernel less per layer)."""
    return _call(SILU_GLU_TARGET, x, w["panels"], w["panels"].shape[0] // 2 * PANEL)
