"""The two device programs: prefill a chunk of prompts, and decode up to ``max_num_steps`` tokens.

Both are pure functions of (params, KV cache, token counts, packed row arrays); the engine jit-compiles
them once per bucket shape with the cache and counts donated, so the updates happen in place. The
architecture is a module with ``forward_hidden`` and ``lm_head`` (see ``maxjax.architectures.llama``).

Shapes: B rows (a batch bucket), T prompt tokens per row (a length bucket), S attention span (a length
bucket), V vocabulary, K = max_logprobs, N = max_num_steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from maxjax.runtime.sampler import SamplingBatch, sample


@struct.dataclass
class PrefillRows:
    tokens: jax.Array  # i32 [B, T]: each row's chunk ends at index T - 1 (``engine.place_prefill_row``)
    positions: jax.Array  # i32 [B, T], -1 for padding (before a row's tokens)
    slots: jax.Array  # i32 [B]: the row's slot (its row of generated-token counts)
    pages: jax.Array  # i32 [B, P]: the row's block table (``maxjax.kernels.paged``)
    samples: jax.Array  # bool [B]: the chunk ends the prompt, so the row samples its first token
    num_generated: jax.Array  # i32 [B]: tokens generated before (non-zero only when re-encoding after reset())
    echo_targets: jax.Array  # i32 [B, T]: the prompt token that follows each position, -1 where none/not asked
    logprobs: jax.Array  # bool [B]: the row asked for log-probabilities
    lora_index: jax.Array  # i32 [B]: the row's LoRA adapter slot (0: the base model)


@struct.dataclass
class DecodeRows:
    tokens: jax.Array  # i32 [B]: the last token of each row (not yet in the cache)
    positions: jax.Array  # i32 [B]: its position
    slots: jax.Array  # i32 [B]: the row's slot (its row of generated-token counts)
    pages: jax.Array  # i32 [B, P]: the row's block table
    steps: jax.Array  # i32 [B]: how many tokens the row may generate in this call (0 for padding rows)
    num_generated: jax.Array  # i32 [B]: tokens generated before this call
    logprobs: jax.Array  # bool [B]
    lora_index: jax.Array  # i32 [B]: the row's LoRA adapter slot (0: the base model)


@struct.dataclass
class LogProbs:
    """Log-probabilities from the model's log-softmax (before penalties and temperature)."""

    token: jax.Array  # f32 [...]: of the chosen/target token
    top_ids: jax.Array  # i32 [..., K]
    top_values: jax.Array  # f32 [..., K]


def _logprobs(logits: jax.Array, targets: jax.Array, k: int) -> LogProbs:
    """logits [..., V], targets [...] -> LogProbs of the targets and the top-k alternatives."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.take_along_axis(lp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(lp, k)
    return LogProbs(token, top_ids.astype(jnp.int32), top_values)


def maybe_logprobs(wanted: jax.Array, logits: jax.Array, targets: jax.Array, k: int) -> LogProbs:
    """Log-probabilities only when some row asked for them; zeros of the same shapes otherwise."""
    shape = targets.shape
    zeros = LogProbs(jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (k,), jnp.int32),
                     jnp.zeros(shape + (k,), jnp.float32))
    return jax.lax.cond(jnp.any(wanted), lambda: _logprobs(logits, targets, k), lambda: zeros)


def _add_counts(counts: jax.Array, tokens: jax.Array, where: jax.Array) -> jax.Array:
    """counts [B, V] += one_hot(tokens) on rows where ``where``."""
    rows = jnp.arange(counts.shape[0])
    return counts.at[rows, tokens].add(where.astype(counts.dtype))


def prefill_step(arch: Any, cfg: Any, k: int, params: Any, cache: Any, counts: jax.Array,
                 rows: PrefillRows, sampling: SamplingBatch, *, kv_len: int, scan_layers: bool = False):
    """Writes a chunk of each row's prompt into its pages; rows whose prompt ends here sample.

    Layers are unrolled by default over the engine's unstacked weights: a scan would first stack every
    layer's weights into new arrays inside the program, a full copy of the model on every call
    (``scan_layers=True`` compiles faster and pays that copy).
    Returns (cache, counts, first_tokens [B], first-token LogProbs [B], echo LogProbs [B, T]).
    The slots' token counts are reset: penalties count the tokens generated since the prompt was encoded.
    Rows are end-aligned (padding first), so attention skips the keys no query of a block can see.
    """
    echo_wanted = jnp.any(rows.echo_targets >= 0)
    hidden, cache = arch.forward_hidden(params, cfg, rows.tokens, rows.positions, cache, rows.pages,
                                        kv_len=kv_len, scan=scan_layers, lora_index=rows.lora_index,
                                        end_aligned=True, every_query=echo_wanted)  # [B, T, D]
    logits = arch.lm_head(params, cfg, hidden[:, -1])  # [B, V]: every row's chunk ends the row
    row_counts = jnp.zeros((rows.tokens.shape[0], counts.shape[1]), counts.dtype)  # [B, V]
    first = sample(logits, row_counts, rows.num_generated, sampling)  # [B]
    first_lp = maybe_logprobs(rows.logprobs & rows.samples, logits, first, k)
    echo_lp = jax.lax.cond(
        echo_wanted,
        lambda: _logprobs(arch.lm_head(params, cfg, hidden), rows.echo_targets, k),  # [B, T, V] only here
        lambda: LogProbs(jnp.zeros(rows.tokens.shape, jnp.float32),
                         jnp.zeros(rows.tokens.shape + (k,), jnp.int32),
                         jnp.zeros(rows.tokens.shape + (k,), jnp.float32)))
    row_counts = _add_counts(row_counts, first, rows.samples)
    valid = rows.positions[:, -1] >= 0
    counts = counts.at[jnp.where(valid, rows.slots, counts.shape[0])].set(row_counts, mode="drop")
    return cache, counts, first, first_lp, echo_lp


def decode_step(arch: Any, cfg: Any, k: int, max_steps: int, params: Any, cache: Any, counts: jax.Array,
                rows: DecodeRows, sampling: SamplingBatch, *, kv_len: int, scan_layers: bool = False):
    """Generates up to ``max_steps`` tokens per row in one device call.

    A row stops after ``rows.steps`` tokens or when it samples one of its stop ids (eos / stop_token_ids);
    stopped and padding rows write nothing to the cache. The loop ends when every row has stopped.
    Layers are unrolled by default: decode is bound by reading the weights, and a scanned body copies each
    layer's weights out of the stacked arrays every step (``scan_layers=True`` measures that).
    Returns (cache, counts, tokens [N, B] (-1 after a row stopped), LogProbs [N, B]).
    """
    num_rows = rows.tokens.shape[0]
    slot_ids = jnp.where(rows.steps > 0, rows.slots, counts.shape[0])  # padding rows drop their updates
    row_counts = counts.at[slot_ids].get(mode="fill", fill_value=0)  # [B, V]
    out_tokens = jnp.full((max_steps, num_rows), -1, jnp.int32)
    out_lp = LogProbs(jnp.zeros((max_steps, num_rows), jnp.float32),
                      jnp.zeros((max_steps, num_rows, k), jnp.int32),
                      jnp.zeros((max_steps, num_rows, k), jnp.float32))
    # Unrolled layers defer the cache write: a step attends to the cache plus its own new K/V, and the next
    # step stores them first (one scatter for all layers; see llama.forward_hidden's defer_write).
    defer = not scan_layers
    pending = None
    if defer:
        kv_shape = (cfg.num_layers, num_rows, 1, cfg.num_kv_heads, cfg.head_dim)
        pending = (jnp.zeros(kv_shape, cache.k.dtype), jnp.zeros(kv_shape, cache.v.dtype),
                   jnp.full((num_rows, 1), -1, jnp.int32))  # (k, v, positions): nothing yet

    def cond(carry):
        i, active = carry[0], carry[1]
        return (i < max_steps) & jnp.any(active)

    def body(carry):
        i, active, cache, pending, row_counts, tokens, positions, num_generated, out_tokens, out_lp = carry
        step_positions = jnp.where(active, positions, -1)[:, None]  # [B, 1]
        if defer:
            cache = arch.write_new_kv(cache, pending[:2], rows.pages, pending[2])
            hidden, cache, new_kv = arch.forward_hidden(params, cfg, tokens[:, None], step_positions, cache,
                                                        rows.pages, kv_len=kv_len, scan=False,
                                                        lora_index=rows.lora_index, defer_write=True)  # [B, 1, D]
            pending = (new_kv[0].astype(cache.k.dtype), new_kv[1].astype(cache.v.dtype), step_positions)
        else:
            hidden, cache = arch.forward_hidden(params, cfg, tokens[:, None], step_positions, cache, rows.pages,
                                                kv_len=kv_len, scan=True, lora_index=rows.lora_index)  # [B, 1, D]
        logits = arch.lm_head(params, cfg, hidden[:, 0])  # [B, V]
        new = sample(logits, row_counts, num_generated, sampling)  # [B]
        lp = maybe_logprobs(rows.logprobs & active, logits, new, k)
        out_tokens = out_tokens.at[i].set(jnp.where(active, new, -1))
        out_lp = jax.tree.map(lambda o, x: o.at[i].set(x), out_lp, lp)
        row_counts = _add_counts(row_counts, new, active)
        stopped = jnp.any(new[:, None] == sampling.stop_ids, axis=-1)
        num_generated = num_generated + active
        positions = positions + active
        tokens = jnp.where(active, new, tokens)
        active = active & ~stopped & (i + 1 < rows.steps)
        return i + 1, active, cache, pending, row_counts, tokens, positions, num_generated, out_tokens, out_lp

    carry = (jnp.int32(0), rows.steps > 0, cache, pending, row_counts, rows.tokens, rows.positions,
             rows.num_generated, out_tokens, out_lp)
    _, _, cache, pending, row_counts, _, _, _, out_tokens, out_lp = jax.lax.while_loop(cond, body, carry)
    if defer:
        cache = arch.write_new_kv(cache, pending[:2], rows.pages, pending[2])
    counts = counts.at[slot_ids].set(row_counts, mode="drop")
    return cache, counts, out_tokens, out_lp
