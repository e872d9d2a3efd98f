"""The device-mesh axes a sharding layout names; `maxjax.runtime.mesh` builds its mesh with these axes.

"model" splits heads, MLP width and vocabulary; "data" splits KV cache slots and batch rows.
"""

from __future__ import annotations

from jax.sharding import Mesh

DATA, MODEL = "data", "model"


def axis_if_divides(mesh: Mesh, axis: str, size: int) -> str | None:
    """``axis`` when it splits ``size`` evenly, else None (replicated): a sharded dimension must divide."""
    return axis if size % mesh.shape[axis] == 0 else None
