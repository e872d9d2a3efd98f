"""The engine's device state on a mesh, and the in/out shardings of its programs.

The architecture's layout module (e.g. `maxjax.architectures.llama_sharding`) describes the tensor-parallel
model: ``tensor_parallel_config``, ``to_tensor_parallel`` (a param rewritten for it), ``param_spec``,
``cache_spec`` and ``counts_spec``; this module places the params with it. Params and KV cache carry the
shardings the layout names (heads, MLP width and
vocabulary over "model"; cache pages over "data"); per-row arrays are split over "data" when the batch
divides, else replicated; everything a program returns to the host is replicated, so every process of a
multi-host run reads the same tokens. The partitioner (GSPMD) inserts the collectives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.mesh import MODEL, from_callback, put, rows_spec
from maxjax.weights.llama_names import tree_reader


def place_state(arch: Any, layout: Any, model_config: Any, params: Any, config: RuntimeConfig, mesh: Mesh,
                dtype: Any, cache_dtype: Any) -> tuple[Any, Any, Any, jax.Array, tuple]:
    """(config of the laid-out model, params, KV cache, token counts, their shardings), all on ``mesh``.

    ``params``: a param tree, or a ``read(key, layer)`` function that loads one param at a time."""
    if layout is None:
        raise ValueError("tensor_parallel / data_parallel: this architecture has no sharding layout")
    if config.quantize is not None:
        raise ValueError(f"quantize={config.quantize!r} is not supported with tensor_parallel / data_parallel > 1")
    cfg, device_params = place_params(arch, layout, params, model_config, mesh, dtype)
    param_shardings = jax.tree.map(lambda a: a.sharding, device_params)
    new_cache = lambda: arch.init_kv_cache(cfg, config.num_pages, config.page_size, cache_dtype)  # noqa: E731
    cache_shardings = jax.tree.map(lambda _: NamedSharding(mesh, layout.cache_spec()), jax.eval_shape(new_cache))
    cache = jax.jit(new_cache, out_shardings=cache_shardings)()
    counts_sharding = NamedSharding(mesh, layout.counts_spec(cfg, mesh))
    counts = jax.jit(lambda: jnp.zeros((config.max_batch_size, cfg.vocab_size), jnp.int32),
                     out_shardings=counts_sharding)()
    return cfg, device_params, cache, counts, (param_shardings, cache_shardings, counts_sharding)


def place_params(arch: Any, layout: Any, params: dict | Callable[[str, int | None], Any], cfg: Any, mesh: Mesh,
                 dtype: Any) -> tuple[Any, dict]:
    """(config, params on ``mesh``) in the serving layout: rewritten for tensor parallelism (module docstring),
    layers unstacked; Q/K/V and gate/up fused (``arch.fuse_projections``) when there is one model shard.

    ``params``: a tree with stacked layers, or ``read(key, layer)`` giving one original param at a time
    (``maxjax.weights.llama_names.param_reader``); each param is placed before the next is read, so the host
    never holds more than one tensor.
    """
    read = params if callable(params) else tree_reader(params)
    tp = mesh.shape[MODEL]
    tp_cfg = layout.tensor_parallel_config(cfg, tp)

    def place(key: str, layer: int | None) -> jax.Array:
        array = read(key, layer)
        sharding = NamedSharding(mesh, layout.param_spec(key, len(array.shape), tp_cfg, mesh))
        if tp_cfg == cfg:  # nothing to rewrite
            if isinstance(array, jax.Array):  # restored onto the mesh already: reshard only
                return jax.device_put(array.astype(dtype), sharding)
            return from_callback(array.shape, dtype, sharding, lambda index: array[index])  # shard by shard
        return put(layout.to_tensor_parallel(key, np.asarray(array, dtype), cfg, tp), sharding)

    keys = arch.param_shapes(cfg)
    params = {key: place(key, None) for key in keys if key != "layers"}
    params["layers"] = [{key: place(key, layer) for key in keys["layers"]} for layer in range(cfg.num_layers)]
    if tp == 1:  # one model shard: fused projections are shard-consistent
        params = arch.fuse_projections(params)
    return tp_cfg, params


def restore_shardings(arch: Any, layout: Any, cfg: Any, mesh: Mesh) -> dict | None:
    """Shardings of the stacked param tree (a model store) restored straight onto ``mesh``, or None when the
    tensor-parallel layout rewrites heads or MLP width (that model is restored to the host, then placed)."""
    if layout.tensor_parallel_config(cfg, mesh.shape[MODEL]) != cfg:
        return None
    shapes = arch.param_shapes(cfg)
    out = {key: NamedSharding(mesh, layout.param_spec(key, len(shape), cfg, mesh)) for key, shape in shapes.items()
           if key != "layers"}
    out["layers"] = {key: NamedSharding(mesh, layout.param_spec(key, len(shape), cfg, mesh))
                     for key, shape in shapes["layers"].items()}
    return out


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
