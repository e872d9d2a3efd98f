"""On-device sampling, vectorised over the batch with per-row parameters.

Every per-row knob is data (a ``[B]`` array in ``SamplingBatch``), never a static argument, so a new
temperature or seed never compiles a new program. Greedy is the ``top_k == 1`` (or ``temperature == 0``)
case of the same program.

Order of operations on the model's float32 logits (the order MAX and vLLM use):

1. repetition penalty over the tokens generated so far (``l / p`` where ``l > 0``, else ``l * p``);
2. frequency and presence penalties (``l -= f * count + p * (count > 0)``);
3. min-new-tokens: eos and stop ids masked while fewer than ``min_tokens`` were generated;
4. structured-output bitmask (bit ``j`` of word ``i`` allows token ``32 i + j``);
5. temperature, then top-k, top-p and min-p filtering of the tempered distribution;
6. a Gumbel-max draw with the key ``fold_in(key(seed), num_generated)``: a row's draw depends only on its
   own seed and position, so a request samples the same tokens alone or inside any batch.

The top-k and top-p thresholds are found by bisection over the order-preserving integer image of the
float values (32 exact steps), so no full-vocabulary sort runs on the hot path; a batch of greedy rows
skips the filtering entirely (``lax.cond`` on a batch-level predicate). Batch-level conditions also skip
the bisections where they cannot change anything (no row limits top-k, or none sets top_p < 1) and take the
k-th largest logit from one ``lax.top_k`` when every row's top_k is at most 64: the same threshold, without
33 dependent passes over the vocabulary (each a kernel, and on a GPU a loop iteration the host waits on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from maxjax.kernels import native

NEG_INF = -jnp.inf


@struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters, all ``[B]`` arrays except where noted."""

    temperature: jax.Array  # f32
    top_k: jax.Array  # i32, 1 = greedy; 0 or >= vocab size = no top-k filtering
    top_p: jax.Array  # f32 in (0, 1]
    min_p: jax.Array  # f32 in [0, 1]
    repetition_penalty: jax.Array  # f32, 1 = off
    frequency_penalty: jax.Array  # f32
    presence_penalty: jax.Array  # f32
    seed: jax.Array  # u32
    min_tokens: jax.Array  # i32
    stop_ids: jax.Array  # i32 [B, E]: eos + stop token ids, -1 padded; masked before min_tokens
    bitmask: jax.Array  # u32 [B, ceil(V / 32)]: allowed tokens, all ones for free rows


def apply_penalties(logits: jax.Array, counts: jax.Array, s: SamplingBatch) -> jax.Array:
    """Repetition, frequency and presence penalties over generated-token counts ``[B, V]``."""
    seen = counts > 0
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - s.frequency_penalty[:, None] * counts
            - s.presence_penalty[:, None] * seen.astype(logits.dtype))


def mask_stop_ids(logits: jax.Array, stop_ids: jax.Array, active: jax.Array) -> jax.Array:
    """Sets the stop ids of rows where ``active`` to -inf (ids of -1 are padding)."""
    rows = jnp.arange(logits.shape[0])[:, None]  # [B, 1]
    cols = jnp.where(active[:, None] & (stop_ids >= 0), stop_ids, logits.shape[1])  # [B, E]
    return logits.at[rows, cols].set(NEG_INF, mode="drop")


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """``[B, W]`` uint32 words -> ``[B, V]`` bool, little-endian bits."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def _sortable(x: jax.Array) -> jax.Array:
    """An int32 image of float32 values that preserves their order (-0.0 and 0.0, equal floats, map to 0)."""
    i = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def top_p_threshold(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row, the smallest probability kept by nucleus filtering: the largest t with
    ``sum(probs[probs >= t]) >= top_p``. probs [B, V] f32 (non-negative), top_p [B]."""
    keys = jax.lax.bitcast_convert_type(probs, jnp.int32)  # order-preserving for non-negative floats

    def step(_, bounds):
        lo, hi = bounds  # invariant: mass(keys >= lo) >= top_p
        mid = lo + (hi - lo + 1) // 2
        mass = jnp.sum(jnp.where(keys >= mid[:, None], probs, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros(probs.shape[:1], jnp.int32)
    hi = jnp.max(keys, axis=-1)
    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    # top_p = 1 keeps everything: the float sum of all probabilities can fall short of 1.
    return jnp.where(top_p >= 1.0, 0.0, jax.lax.bitcast_convert_type(lo, jnp.float32))


def filter_logits(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    """Tempered logits with everything outside top-k, top-p and min-p set to -inf."""
    vocab = logits.shape[-1]
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    logits = logits / temp
    # top-k: keep logits >= the k-th largest (k <= 0 or >= V: no limit).
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    keys = _sortable(logits)
    # The same k-th largest value either way: from lax.top_k when every row's k is small (or unlimited), else
    # by bisection; a batch whose rows all keep the whole vocabulary skips both.
    small = min(TOP_K_CANDIDATES, vocab)
    kth = jax.lax.cond(jnp.all(k >= vocab), lambda: jnp.min(keys, axis=-1),
                       lambda: jax.lax.cond(jnp.all((k <= small) | (k >= vocab)),
                                            lambda: _kth_largest_small(logits, keys, k, small),
                                            lambda: _kth_largest(keys, k)))
    logits = jnp.where(keys >= kth[:, None], logits, NEG_INF)
    # top-p and min-p on the renormalised distribution (the bisection only when some row sets top_p < 1).
    probs = jax.nn.softmax(logits, axis=-1)
    p_min = jax.lax.cond(jnp.any(s.top_p < 1.0), top_p_threshold, lambda probs, top_p: jnp.zeros_like(top_p),
                         probs, s.top_p)
    p_min = jnp.maximum(p_min, s.min_p * jnp.max(probs, axis=-1))
    return jnp.where(probs >= p_min[:, None], logits, NEG_INF)


TOP_K_CANDIDATES = 64  # rows with top_k up to this take the k-th largest logit from one lax.top_k


def _kth_largest_small(logits: jax.Array, keys: jax.Array, k: jax.Array, candidates: int) -> jax.Array:
    """`_kth_largest` of ``keys = _sortable(logits)`` for rows with k <= ``candidates`` (rows with k >= V: the
    smallest key), from the ``candidates`` largest logits, sorted with repeats as the bisection counts them.
    (lax.top_k of the float logits: XLA CPU sorts the whole row for an integer top_k.)"""
    top = jax.lax.top_k(logits, candidates)[0]  # [B, candidates], descending
    kth = jnp.take_along_axis(top, jnp.clip(k - 1, 0, candidates - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(k >= keys.shape[-1], jnp.min(keys, axis=-1), _sortable(kth))


def _kth_largest(keys: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the k-th largest of int32 ``keys`` [B, V], by bisection in 32 exact steps."""
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1)

    def step(_, bounds):
        lo, hi = bounds  # invariant: count(keys >= lo) >= k
        # (hi - lo) can exceed int32: halve each bound first.
        mid = (lo >> 1) + (hi >> 1) + ((lo & 1) + (hi & 1) + 1) // 2
        ok = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        done = lo >= hi
        return (jnp.where(done | ~ok, lo, mid),
                jnp.where(done, hi, jnp.where(ok, hi, mid - 1)))

    lo, _ = jax.lax.fori_loop(0, 33, step, (lo, hi))
    return lo


ARGMAX_TARGET = "maxjax_argmax"  # FFI target (maxjax.kernels.native.KERNELS)


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 (the first index of the maximum). On the CPU by the native kernel
    (``kernels/native/argmax.cc``) or from two plain reductions (the max, then the smallest index holding it, as
    float32: exact below 2**24): XLA CPU runs the (value, index) pair reduction of argmax element by element, 7x
    slower over a batch of 8 rows of 49152, and even the plain reductions read ~1 GB/s. Elsewhere the pair
    reduction is one kernel. A row holding a NaN gives its first NaN's index, except in the two-reduction form
    (used without the native kernels), where it is unspecified."""
    size = x.shape[-1]
    if jax.default_backend() != "cpu" or size >= 1 << 24:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    if x.dtype == jnp.float32 and size > 0 and native.ffi_target(ARGMAX_TARGET) is not None:
        rows = x.reshape(-1, size)
        out = jax.ffi.ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32))(rows)
        return out.reshape(x.shape[:-1])
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, index, jnp.float32(size)), axis=-1)
    return jnp.minimum(first, size - 1).astype(jnp.int32)


def processed_logits(logits: jax.Array, counts: jax.Array, num_generated: jax.Array,
                     s: SamplingBatch) -> jax.Array:
    """Steps 1-4 of the order above: penalties, the min-tokens stop mask and the grammar bitmask.

    Greedy rows take the argmax of these (`greedy_tokens`); sampled rows draw from ``filter_logits`` of them.
    ``sample`` and the speculative verify step (``maxjax.runtime.verify``) share this, so both see the same
    distribution.
    """
    vocab = logits.shape[-1]
    logits = apply_penalties(logits, counts, s)
    logits = mask_stop_ids(logits, s.stop_ids, num_generated < s.min_tokens)
    return jnp.where(unpack_bitmask(s.bitmask, vocab), logits, NEG_INF)


def greedy_tokens(logits: jax.Array, counts: jax.Array, num_generated: jax.Array, s: SamplingBatch) -> jax.Array:
    """int32 [B]: the argmax of ``processed_logits``. On the CPU a batch where no row sets a penalty, a min-tokens
    stop mask or a grammar bitmask (`changes_logits`) skips those passes over [B, V]: they took longer than the
    argmax itself (~2 ms of a batch-32 step). (The branches return tokens, not logits: a branch returning its
    operand costs XLA two copies of [B, V].) Elsewhere the passes are one fused kernel, cheaper than a
    conditional the host may wait on."""
    if jax.default_backend() != "cpu":
        return argmax(processed_logits(logits, counts, num_generated, s))
    return jax.lax.cond(changes_logits(num_generated, s),
                        lambda logits: argmax(processed_logits(logits, counts, num_generated, s)), argmax, logits)


def changes_logits(num_generated: jax.Array, s: SamplingBatch) -> jax.Array:
    """bool []: whether any row's penalties, min-tokens stop mask or grammar bitmask can change its logits."""
    penalized = (s.repetition_penalty != 1) | (s.frequency_penalty != 0) | (s.presence_penalty != 0)
    stop_masked = (num_generated < s.min_tokens) & jnp.any(s.stop_ids >= 0, axis=-1)
    constrained = jnp.any(s.bitmask != jnp.uint32(0xFFFFFFFF), axis=-1)
    return jnp.any(penalized | stop_masked | constrained)


def greedy_rows(s: SamplingBatch) -> jax.Array:
    """bool [B]: rows that take the argmax (top_k == 1 or temperature == 0)."""
    return (s.top_k == 1) | (s.temperature == 0)


def row_keys(seed: jax.Array, num_generated: jax.Array) -> jax.Array:
    """Per-row random keys ``fold_in(key(seed), num_generated)``: a row's draw depends on its own state only."""
    return jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(seed, num_generated)


def sample(logits: jax.Array, counts: jax.Array, num_generated: jax.Array,
           s: SamplingBatch) -> jax.Array:
    """Next token ids ``[B]`` from float32 ``logits [B, V]``.

    ``counts [B, V]`` holds how often each token was generated so far, ``num_generated [B]`` how many tokens
    were generated (it selects the random stream and the min-tokens mask).
    """
    vocab = logits.shape[-1]
    greedy_row = greedy_rows(s)
    greedy = greedy_tokens(logits, counts, num_generated, s)  # [B]

    def draw(logits):
        filtered = filter_logits(processed_logits(logits, counts, num_generated, s), s)
        keys = row_keys(s.seed, num_generated)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
        return argmax(filtered + gumbel)

    drawn = jax.lax.cond(jnp.all(greedy_row), lambda _: greedy, draw, logits)
    return jnp.where(greedy_row, greedy, drawn)
