"""GGUF block weights (Q4_0, Q4_1, Q8_0; see the format comment in ``quantized.py``) repacked for the native CPU
kernel (``kernels/native/block_matmul.cc``): panels of 32 output channels, each value's 32 channels contiguous.

A packed weight is ``{"block_panels": q, "scale": s, "min": m}`` (no "min" for Q8_0), P = O / 32, B = D / 32:
  4-bit: q uint8 [P, B, 16, 32] = the file's byte j of block b of output 32p + i at [p, b, j, i] (low nibble:
         value 32b + j, high nibble: value 32b + 16 + j); s, m float16 [P, B, 32]. Q4_0 is packed with
         m = -8 s (exact in float16), so one kernel computes both as nibble * s + m.
  Q8_0:  q int8 [P, B, 32, 32] = value 32b + j of output 32p + i at [p, b, j, i]; s float16 [P, B, 32].
Why: the kernel puts the output channels in the vector lanes, so a value of x multiplies 16 dequantized weights
at once with no horizontal sum, and each weight is dequantized once per call for up to 8 rows of x. The
bytes are the file's own, reordered (plus Q4_0's min): a decode step reads what the file holds.
Only on the CPU backend, for unstacked weights whose output count is a multiple of 32; Q4_K and everything
else keep ``quantized.block_matmul``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import panels
from maxjax.kernels import native

PANEL = 32  # output channels per panel
BLOCK = 32  # values per GGUF block
Q4_TARGET = "maxjax_q4_matmul"  # FFI targets (maxjax.kernels.native.KERNELS)
Q8_TARGET = "maxjax_q8_matmul"
_F16_MAX_SCALE = 8191.0  # Q4_0: -8 * scale must stay finite in float16


def is_block_panels(w: Any) -> bool:
    return isinstance(w, dict) and "block_panels" in w


def _xp(a: Any):
    return np if isinstance(a, np.ndarray) else jnp


def packable(w: Any) -> bool:
    """A single (unstacked) Q4_0, Q4_1 or Q8_0 block weight with whole panels of output channels."""
    if not isinstance(w, dict) or "q" not in w or not set(w) <= {"q", "scale", "min"}:
        return False
    q, scale = w["q"], w["scale"]
    if q.shape[0] % PANEL or scale.dtype != np.float16:
        return False
    if q.dtype == np.int8:
        return q.ndim == 2 and q.shape[1] % BLOCK == 0
    if q.dtype != np.uint8 or q.ndim != 3 or q.shape[2] != BLOCK // 2:
        return False
    return "min" in w or float(np.abs(np.asarray(scale, np.float32)).max(initial=0)) <= _F16_MAX_SCALE


def pack(w: dict[str, Any]) -> dict[str, Any]:
    """A block weight [O, D] -> its panels (numpy stays numpy; a device array is packed on the device)."""
    xp = _xp(w["q"])
    q, scale = w["q"], w["scale"]
    panels, blocks = q.shape[0] // PANEL, scale.shape[1]
    to_panels = lambda a: xp.transpose(a.reshape(panels, PANEL, blocks), (0, 2, 1))  # noqa: E731  [P, B, 32]
    out = {"block_panels": xp.transpose(q.reshape(panels, PANEL, blocks, -1), (0, 2, 3, 1)),
           "scale": to_panels(scale)}
    if q.dtype != np.int8:
        out["min"] = to_panels(w["min"]) if "min" in w else to_panels(scale * xp.float16(-8))
    return {k: np.ascontiguousarray(v) for k, v in out.items()} if xp is np else out


def unpack(w: dict[str, Any], q4_0: bool = False) -> dict[str, Any]:
    """The block weight back (tests); ``q4_0``: drop the min a Q4_0 weight was packed with."""
    xp = _xp(w["block_panels"])
    q = w["block_panels"]
    panels, blocks = q.shape[:2]
    from_panels = lambda a: xp.transpose(a, (0, 2, 1)).reshape(panels * PANEL, blocks)  # noqa: E731
    q = xp.transpose(q, (0, 3, 1, 2)).reshape(panels * PANEL, blocks, -1)
    out = {"q": q.reshape(q.shape[0], -1) if q.dtype == np.int8 else q, "scale": from_panels(w["scale"])}
    if "min" in w and not q4_0:
        out["min"] = from_panels(w["min"])
    return out


def pack_block_weights(params: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Every packable block weight named in ``names`` (per layer) and the output projection packed, when the
    native kernel is available; a tied block embedding gets a packed copy as "lm_head" for the logits (lookups
    keep reading the embedding). Else params unchanged."""
    if native.ffi_target(Q4_TARGET) is None or native.ffi_target(Q8_TARGET) is None:
        return params
    return panels.pack_weights(params, names, packable, pack, params.get("lm_head", params["embed"]))  # tied: embed


def block_panel_matmul(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    """x [..., D] @ W.T -> [..., O] float32 for a packed block weight, by the native kernel."""
    q = w["block_panels"]
    target, operands = (Q8_TARGET, (q, w["scale"])) if q.dtype == jnp.int8 else (Q4_TARGET, (q, w["scale"], w["min"]))
    native.ffi_target(target)  # registered when the weights were packed; a no-op then
    rows = x.reshape(-1, q.shape[1] * BLOCK).astype(jnp.float32)
    out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], q.shape[0] * PANEL), jnp.float32))(
        rows, *operands)
    return out.reshape(*x.shape[:-1], q.shape[0] * PANEL)
