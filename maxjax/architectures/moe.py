"""Top-k routed mixture of experts (Qwen3-MoE, Mixtral-style) that computes only the selected experts.

Routing (as transformers): softmax over the router logits in float32, the top k experts per token, their
weights optionally renormalized to sum to 1. Each (token, expert) assignment is then computed once:

- the assignments are sorted by expert and laid out in blocks of `block` rows, each block holding rows of a
  single expert (an expert's group is padded up to a multiple of `block`), so a block is one small matmul
  against one expert's weights;
- blocks run one after another (`lax.map`), each reading only its own expert's weights;
- few tokens (decode: one per row): `block` = 1, one block per assignment, so the work and the weights read
  scale with the tokens' k experts, not with the number of experts;
- many tokens (prefill): larger blocks, so each expert's weights are read about once per block of tokens;
  at most block - 1 padding rows per expert are wasted.
The block size depends only on static shapes, so it never causes a recompile.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def route(h: jax.Array, router: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Routing weights [N, k] (h's dtype) and expert ids [N, k] int32 for tokens h [N, D]; router [D, E]."""
    logits = (h @ router).astype(jnp.promote_types(h.dtype, jnp.float32))  # [N, E]
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)  # [N, k]
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def block_size(num_assignments: int, num_experts: int) -> int:
    """Rows per expert block: 1 while there are no more assignments than experts, else the power of two
    nearest below assignments / experts (so that padding stays below about half of the work)."""
    per_expert = num_assignments // num_experts
    return 1 if per_expert < 2 else 1 << (per_expert.bit_length() - 1)


def _gated(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act: Callable) -> jax.Array:
    """Batched expert MLPs: x [n, b, D] with weights [n, D, F], [n, D, F], [n, F, D] -> [n, b, D]."""
    hidden = act(jnp.einsum("nbd,ndf->nbf", x, w_gate)) * jnp.einsum("nbd,ndf->nbf", x, w_up)
    return jnp.einsum("nbf,nfd->nbd", hidden, w_down)


def expert_mlp(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
               w_down: jax.Array, act: Callable) -> jax.Array:
    """sum_k weights[n, k] * MLP_{experts[n, k]}(x[n]) for x [N, D]; expert weights [E, D, F] / [E, F, D]."""
    N, D = x.shape
    k, E = experts.shape[1], w_gate.shape[0]
    A = N * k  # assignments
    block = block_size(A, E)
    num_blocks = A if block == 1 else -(-(A + E * (block - 1)) // block)  # static upper bound
    flat = experts.reshape(A)  # [A]
    order = jnp.argsort(flat, stable=True)  # [A]: assignments sorted by expert
    sorted_experts = flat[order]
    counts = jnp.bincount(flat, length=E)  # [E]
    padded = (counts + block - 1) // block * block  # [E]: each group rounded up to whole blocks
    padded_end = jnp.cumsum(padded)
    group_start, padded_start = jnp.cumsum(counts) - counts, padded_end - padded
    row = padded_start[sorted_experts] + jnp.arange(A) - group_start[sorted_experts]  # [A]: row of each
    row_token = jnp.full(num_blocks * block, N, jnp.int32).at[row].set(order // k)  # N: empty row
    xs = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[row_token]  # [P, D]
    xs = xs.reshape(num_blocks, block, D)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), E - 1)
    # One block at a time, indexing its expert's weights in place (measured on XLA CPU, 8 tokens, top-2 of 32:
    # ~3x faster than gathering every assignment's weights into one batched matmul, which copies them).
    ys = jax.lax.map(lambda item: _gated(item[0][None], w_gate[item[1]][None], w_up[item[1]][None],
                                         w_down[item[1]][None], act)[0], (xs, block_expert))
    ys = ys.reshape(num_blocks * block, D)
    position = jnp.zeros(A, jnp.int32).at[order].set(row)  # [A]: row of assignment a (token a // k)
    out = ys[position].reshape(N, k, D)
    return jnp.einsum("nkd,nk->nd", out, weights)


def sparse_moe(h: jax.Array, router: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               k: int, normalize: bool, act: Callable) -> jax.Array:
    """The mixture-of-experts feed-forward of a decoder layer: h [B, T, D] -> [B, T, D]."""
    B, T, D = h.shape
    flat = h.reshape(B * T, D)
    weights, experts = route(flat, router, k, normalize)  # [N, k] each
    return expert_mlp(flat, experts, weights, w_gate, w_up, w_down, act).reshape(B, T, D)
