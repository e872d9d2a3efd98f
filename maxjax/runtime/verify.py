"""The speculative verify program: one forward pass over each row's last token and its K drafts, and the
acceptance decision on the device.

Position ``j`` of a row holds token ``tokens[j]`` at position ``start + j``; its logits give the target's
distribution for the token after it, processed exactly as ``sample`` does (penalties counting the drafts
before it, the min-tokens mask at generated index ``num_generated + j``, the bitmask, temperature and the
top-k/p, min-p filters: ``maxjax.runtime.sampler``).

Acceptance, per row, draft by draft (drafters are deterministic, so the draft distribution ``q`` is a
point mass on the draft ``x``):

* greedy rows accept the longest prefix of drafts equal to the argmax, then emit the argmax after it;
* sampled rows accept ``x`` with probability ``min(1, p(x) / q(x)) = p(x)``; at the first rejection they
  sample from ``norm(max(p - q, 0))`` = ``p`` without ``x``; when every draft is accepted they sample a
  bonus token from ``p``. The emitted tokens are then distributed exactly as the target's own samples.

Rows with no drafts just decode one token. Every position's K/V is written; those after the accepted ones
are stale but harmless: attention masks keys by position, and the next pass rewrites them first.

Shapes: B rows, T = K + 1 positions, S attention span, V vocabulary, N = max_logprobs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from maxjax.runtime.sampler import (NEG_INF, SamplingBatch, argmax, filter_logits, greedy_rows, greedy_tokens,
                                    processed_logits, row_keys)
from maxjax.runtime.steps import maybe_logprobs


@struct.dataclass
class VerifyRows:
    tokens: jax.Array  # i32 [B, T]: the row's last token (not yet in the cache), then its drafts (0 padded)
    start: jax.Array  # i32 [B]: the position of tokens[:, 0]
    num_drafts: jax.Array  # i32 [B]: drafts in tokens[:, 1:] (0..K)
    active: jax.Array  # bool [B]: False for padding rows (they write and count nothing)
    slots: jax.Array  # i32 [B]: the row's slot (its row of generated-token counts)
    pages: jax.Array  # i32 [B, P]: the row's block table
    num_generated: jax.Array  # i32 [B]: tokens generated before this call
    logprobs: jax.Array  # bool [B]
    lora_index: jax.Array  # i32 [B]


def _position_counts(row_counts: jax.Array, drafts: jax.Array, is_draft: jax.Array) -> jax.Array:
    """[B, T, V] generated-token counts seen by each position: the row's counts plus the drafts before it."""
    hits = jax.nn.one_hot(drafts, row_counts.shape[-1], dtype=row_counts.dtype) * is_draft[..., None]  # [B, K, V]
    before = jnp.concatenate([jnp.zeros_like(hits[:, :1]), jnp.cumsum(hits, axis=1)], axis=1)  # [B, T, V]
    return row_counts[:, None] + before


def _sampled_acceptance(processed: jax.Array, drafts: jax.Array, is_draft: jax.Array, flat_s: SamplingBatch,
                        keys: jax.Array):
    """The rejection rule with a point-mass drafter. Returns (accepted [B, K], token if stopping at j [B, T])."""
    num_rows, positions, vocab = processed.shape
    filtered = filter_logits(processed.reshape(-1, vocab), flat_s).reshape(processed.shape)  # [B, T, V]
    probs = jax.nn.softmax(filtered, axis=-1)
    p_draft = jnp.take_along_axis(probs[:, :-1], drafts[..., None], axis=-1)[..., 0]  # [B, K]
    uniform = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(keys)
    uniform = uniform.reshape(num_rows, positions)[:, :-1]  # [B, K]
    removed = jax.nn.one_hot(drafts, vocab, dtype=bool) & is_draft[..., None]  # [B, K, V]
    removed = jnp.concatenate([removed, jnp.zeros_like(removed[:, :1])], axis=1)  # [B, T, V]: bonus keeps all
    residual = jnp.where(removed, NEG_INF, filtered)
    # Rounding can leave p(x) a hair under 1 for the only allowed token: nothing else to sample, so accept.
    nothing_else = ~jnp.any(jnp.isfinite(residual[:, :-1]), axis=-1)  # [B, K]
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(keys)  # [B * T, V]
    stop_token = argmax(residual + gumbel.reshape(processed.shape))  # [B, T]
    return (uniform < p_draft) | nothing_else, stop_token


def verify_step(arch: Any, cfg: Any, k: int, params: Any, cache: Any, counts: jax.Array, rows: VerifyRows,
                sampling: SamplingBatch, *, kv_len: int, scan_layers: bool = False):
    """Scores T = K + 1 positions per row and accepts drafts (see the module docstring).

    Returns (cache, counts, tokens [B, T]: the accepted drafts then one target token, -1 after, LogProbs [B, T]).
    """
    num_rows, positions = rows.tokens.shape
    j = jnp.arange(positions)
    fed = rows.active[:, None] & (j[None] <= rows.num_drafts[:, None])  # [B, T]
    hidden, cache = arch.forward_hidden(params, cfg, rows.tokens, jnp.where(fed, rows.start[:, None] + j, -1),
                                        cache, rows.pages, kv_len=kv_len, scan=scan_layers,
                                        lora_index=rows.lora_index)  # [B, T, D]
    logits = arch.lm_head(params, cfg, hidden)  # [B, T, V]
    vocab = logits.shape[-1]
    slot_ids = jnp.where(rows.active, rows.slots, counts.shape[0])  # padding rows drop their updates
    row_counts = counts.at[slot_ids].get(mode="fill", fill_value=0)  # [B, V]
    drafts = rows.tokens[:, 1:]  # [B, K]
    is_draft = j[None, :-1] < rows.num_drafts[:, None]  # [B, K]

    flat_s = jax.tree.map(lambda a: jnp.repeat(a, positions, axis=0), sampling)  # every field per position
    flat_generated = (rows.num_generated[:, None] + j).reshape(-1)  # [B * T]
    flat = (logits.reshape(-1, vocab), _position_counts(row_counts, drafts, is_draft).reshape(-1, vocab),
            flat_generated, flat_s)  # every position a row of [B * T, V]
    greedy_token = greedy_tokens(*flat).reshape(drafts.shape[0], -1)  # [B, T]
    greedy = greedy_rows(sampling)
    accepted, stop_token = jax.lax.cond(
        jnp.all(greedy),
        lambda: (drafts == greedy_token[:, :-1], greedy_token),
        lambda: _sampled_acceptance(processed_logits(*flat).reshape(logits.shape), drafts, is_draft, flat_s,
                                    row_keys(flat_s.seed, flat_generated)))
    accepted = jnp.where(greedy[:, None], drafts == greedy_token[:, :-1], accepted) & is_draft
    stop_token = jnp.where(greedy[:, None], greedy_token, stop_token)
    num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)  # [B]
    padded_drafts = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)  # [B, T]
    out = jnp.where(j < num_accepted[:, None], padded_drafts,
                    jnp.where(j == num_accepted[:, None], stop_token, -1))
    out = jnp.where(rows.active[:, None], out, -1).astype(jnp.int32)
    lp = maybe_logprobs(rows.logprobs & rows.active, logits, out, k)
    emitted = jax.nn.one_hot(out, vocab, dtype=counts.dtype) * (out >= 0)[..., None]  # [B, T, V]
    counts = counts.at[slot_ids].set(row_counts + jnp.sum(emitted, axis=1), mode="drop")
    return cache, counts, out, lp
