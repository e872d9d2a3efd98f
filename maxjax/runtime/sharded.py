"""The engine's device state on a mesh, and the in/out shardings of its programs.

Params and KV cache carry the shardings the architecture's layout module names (heads, MLP width and
vocabulary over "model"; cache slots over "data"); per-row arrays are split over "data" when the batch
divides, else replicated; everything a program returns to the host is replicated, so every process of a
multi-host run reads the same tokens. The partitioner (GSPMD) inserts the collectives.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.mesh import put, rows_spec


def place_state(arch: Any, layout: Any, model_config: Any, params: Any, config: RuntimeConfig, mesh: Mesh,
                dtype: Any) -> tuple[Any, Any, Any, jax.Array, tuple]:
    """(config of the laid-out model, params, KV cache, token counts, their shardings), all on ``mesh``.

    ``params``: a param tree, or a ``read(key, layer)`` function that loads one param at a time."""
    if layout is None:
        raise ValueError("tensor_parallel / data_parallel: this architecture has no sharding layout")
    if config.quantize is not None:
        raise ValueError(f"quantize={config.quantize!r} is not supported with tensor_parallel / data_parallel > 1")
    cfg, device_params = layout.place_params(params, model_config, mesh, dtype)
    param_shardings = jax.tree.map(lambda a: a.sharding, device_params)
    new_cache = lambda: arch.init_kv_cache(cfg, config.max_batch_size, config.max_seq_len, dtype)  # noqa: E731
    cache_shardings = jax.tree.map(lambda _: NamedSharding(mesh, layout.cache_spec()), jax.eval_shape(new_cache))
    cache = jax.jit(new_cache, out_shardings=cache_shardings)()
    counts_sharding = NamedSharding(mesh, layout.counts_spec(cfg, mesh))
    counts = jax.jit(lambda: jnp.zeros((config.max_batch_size, cfg.vocab_size), jnp.int32),
                     out_shardings=counts_sharding)()
    return cfg, device_params, cache, counts, (param_shardings, cache_shardings, counts_sharding)


def row_shardings(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda a: NamedSharding(mesh, rows_spec(mesh, a)), tree)


def put_rows(mesh: Mesh, tree: Any) -> Any:
    """Host per-row arrays as global arrays (each process passes the same host values)."""
    return jax.tree.map(lambda a: put(a, NamedSharding(mesh, rows_spec(mesh, a))), tree)


def program_shardings(mesh: Mesh, state_shardings: tuple, kind: str, rows: Any, sampling: Any) -> dict:
    """``in_shardings`` / ``out_shardings`` of a prefill or decode program (see ``maxjax.runtime.steps``)."""
    param_shardings, cache_shardings, counts_sharding = state_shardings
    replicated = NamedSharding(mesh, P())
    host_outputs = (replicated,) * (3 if kind == "prefill" else 2)  # tokens and LogProbs
    return dict(in_shardings=(param_shardings, cache_shardings, counts_sharding, row_shardings(mesh, rows),
                              row_shardings(mesh, sampling)),
                out_shardings=(cache_shardings, counts_sharding) + host_outputs)
