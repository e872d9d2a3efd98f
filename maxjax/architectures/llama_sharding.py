"""Tensor-parallel layout of Llama params: heads, MLP and expert widths, vocabulary split over the mesh's "model" axis.

Each "model" shard must hold whole heads, and the query heads of a shard must use kv heads of the same shard.
When the head counts do not divide the shard count, the params are rewritten at load time into an equivalent
model whose counts do (as the serving engines do):

* kv heads are replicated r = tp / gcd(KVH, tp) times, so KVH' = r * KVH divides by tp;
* each kv head's group of G query heads is split over its r copies, ceil(G / r) heads each, and the missing
  query heads are padding: zero Q columns and zero output-projection rows, so they add exactly 0;
* the MLP width is padded with zero gate/up columns and zero down rows to a multiple of tp
  (silu(0) * 0 = 0).

Examples: SmolLM2 (9 heads, 3 kv heads) at tp 3 is unchanged; at tp 2 it becomes 12 heads / 6 kv heads
(2 query heads per kv head, 3 of them padding); Llama-3-8B (32/8) at tp 16 becomes 32 / 16 (each kv head twice).
The embedding / LM head is split over the vocabulary when tp divides it, else replicated. Norms are replicated.
Q/K/V and gate/up stay separate matrices under tensor parallelism: a fused matrix split evenly would mix
Q columns with K/V columns across shards.

Mixture-of-experts weights (e_gate / e_up [E, D, Fe], e_down [E, Fe, D]) are split over each expert's MLP width,
padded like the dense MLP to a multiple of tp: every shard holds every expert's 1/tp columns, so the routed
math of `maxjax.architectures.moe` (a per-block dynamic index into the expert axis) stays shard-local, costs one
all-reduce per layer as the dense MLP, and splits the work evenly whatever the routing. Splitting the expert
axis instead makes the partitioner all-gather every expert's weights at each call, slower than replicating them
(`benchmarks/bench_moe_sharding.py`), so it is not used, and no expert count forces replication. The router is
replicated.

This module only describes the layout (rewritten params and PartitionSpecs); `maxjax.runtime.sharded` places
the params onto a mesh with it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from maxjax.architectures.llama import LlamaConfig
from maxjax.architectures.mesh_axes import DATA, MODEL, axis_if_divides

# param key -> (sharded axis counted from the end, what it splits); every other param is replicated.
_SPLIT = {
    "wq": (-1, "heads"), "wk": (-1, "heads"), "wv": (-1, "heads"),
    "bq": (-1, "heads"), "bk": (-1, "heads"), "bv": (-1, "heads"),
    "wo": (-2, "heads"),
    "w_gate": (-1, "width"), "w_up": (-1, "width"), "w_down": (-2, "width"),
    "embed": (-2, "vocab"), "lm_head": (-1, "vocab"),
    "e_gate": (-1, "expert_width"), "e_up": (-1, "expert_width"), "e_down": (-2, "expert_width"),
}


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where each query / kv head of the tensor-parallel model comes from (-1: a padding query head)."""

    q_source: np.ndarray  # i32 [H']
    kv_source: np.ndarray  # i32 [KVH']
    width: int  # padded MLP width F'
    expert_width: int  # padded width of each expert's MLP Fe' (0: no experts)


def head_layout(cfg: LlamaConfig, tp: int) -> HeadLayout:
    kvh, group = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    copies = tp // math.gcd(kvh, tp)  # r
    per_copy = -(-group // copies)  # ceil(G / r)
    kv_source = np.repeat(np.arange(kvh), copies)  # new kv head g*r + c <- original kv head g
    q_source = np.full(kvh * copies * per_copy, -1, np.int32)
    for new_kv, kv in enumerate(kv_source):
        copy = new_kv % copies
        for j in range(per_copy):
            in_group = copy * per_copy + j
            if in_group < group:
                q_source[new_kv * per_copy + j] = kv * group + in_group
    width = -(-cfg.intermediate_size // tp) * tp
    expert_width = -(-cfg.moe_intermediate_size // tp) * tp
    return HeadLayout(q_source, kv_source.astype(np.int32), width, expert_width)


def tensor_parallel_config(cfg: LlamaConfig, tp: int) -> LlamaConfig:
    """The config of the rewritten model (padded / replicated heads, padded MLP and expert widths)."""
    layout = head_layout(cfg, tp)
    return dataclasses.replace(cfg, num_heads=len(layout.q_source), num_kv_heads=len(layout.kv_source),
                               intermediate_size=layout.width, moe_intermediate_size=layout.expert_width)


def _take_heads(array: np.ndarray, axis: int, source: np.ndarray, head_dim: int) -> np.ndarray:
    """Head blocks of ``array`` along ``axis`` (heads * head_dim) picked by ``source``; -1 gives zeros."""
    axis = axis % array.ndim
    heads = array.reshape(array.shape[:axis] + (-1, head_dim) + array.shape[axis + 1:])
    picked = np.take(heads, np.maximum(source, 0), axis=axis)
    mask_shape = [1] * picked.ndim
    mask_shape[axis] = len(source)
    picked = np.where((source >= 0).reshape(mask_shape), picked, 0).astype(array.dtype)
    return picked.reshape(array.shape[:axis] + (-1,) + array.shape[axis + 1:])


def _pad_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    axis = axis % array.ndim
    if array.shape[axis] == size:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, size - array.shape[axis])
    return np.pad(array, pad)


def to_tensor_parallel(key: str, array: np.ndarray, cfg: LlamaConfig, tp: int) -> np.ndarray:
    """One param (stacked [L, ...] or one layer's) in the layout of `tensor_parallel_config(cfg, tp)`."""
    if tp == 1 or key not in _SPLIT or _SPLIT[key][1] == "vocab":
        return array
    layout = head_layout(cfg, tp)
    axis, what = _SPLIT[key]
    if what in ("width", "expert_width"):
        return _pad_axis(array, axis, getattr(layout, what))
    source = layout.q_source if key in ("wq", "bq", "wo") else layout.kv_source
    return _take_heads(array, axis, source, cfg.head_dim)


def param_spec(key: str, ndim: int, cfg: LlamaConfig, mesh: Mesh) -> P:
    """The PartitionSpec of one param of the tensor-parallel model (leading layer axis, if any, unsplit)."""
    spec: list[str | None] = [None] * ndim
    if key in _SPLIT and mesh.shape[MODEL] > 1:
        axis, what = _SPLIT[key]
        if what == "vocab":
            spec[axis] = axis_if_divides(mesh, MODEL, cfg.vocab_size)
        else:
            spec[axis] = MODEL
    return P(*spec)


def cache_spec() -> P:
    """KV cache pages [L, pages, KVH', page positions, Dh]: pages over "data", kv heads over "model"."""
    return P(None, DATA, MODEL, None, None)


def counts_spec(cfg: LlamaConfig, mesh: Mesh) -> P:
    """Generated-token counts [slots, V]: slots over "data", vocabulary as the logits."""
    return P(DATA, axis_if_divides(mesh, MODEL, cfg.vocab_size))
