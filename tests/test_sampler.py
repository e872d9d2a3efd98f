"""The on-device sampler against exact numpy references: distributions, penalties, masks, seeds."""

import contextlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from maxjax.runtime.engine import empty_sampling
from maxjax.runtime.sampler import SamplingBatch, apply_penalties, sample

V = 16
LOGITS = np.array([3.0, 2.5, 2.2, 2.0, 1.5, 1.2, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0],
                  np.float32)
sample_jit = jax.jit(sample)


def batch(n, **fields):
    arrays = empty_sampling(n, V, 4)
    for name, value in fields.items():
        arrays[name][...] = value
    return SamplingBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})


def exact_distribution(logits, temperature=1.0, top_k=V, top_p=1.0, min_p=0.0):
    """The documented order: temperature, top-k, softmax, top-p (smallest set reaching top_p), min-p."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    keep = np.zeros(V, bool)
    keep[order[:top_k]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    cumulative = np.cumsum(p[order])
    n_keep = np.searchsorted(cumulative, top_p - 1e-12) + 1 if top_p < 1 else V
    nucleus = np.zeros(V, bool)
    nucleus[order[:n_keep]] = True
    keep &= nucleus & (p >= min_p * p.max())
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=0),
    dict(temperature=0.7, top_k=0),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_k=0, top_p=0.8),
    dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=0, min_p=0.2),
])
def test_sampled_frequencies_match_the_exact_distribution(params):
    n = 20000
    top_k = params.get("top_k", V) or V
    expected = exact_distribution(LOGITS, params["temperature"], top_k, params.get("top_p", 1.0),
                                  params.get("min_p", 0.0))
    s = batch(n, temperature=params["temperature"], top_k=top_k, top_p=params.get("top_p", 1.0),
              min_p=params.get("min_p", 0.0), seed=np.arange(n))
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, V))
    tokens = np.asarray(sample_jit(logits, jnp.zeros((n, V), jnp.int32), jnp.zeros(n, jnp.int32), s))
    counts = np.bincount(tokens, minlength=V)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
    support = expected > 0
    chi2 = stats.chisquare(counts[support], expected[support] * n)
    assert chi2.pvalue > 1e-3, (counts, expected * n)


def test_greedy_rows_take_the_argmax_whatever_the_temperature():
    s = batch(3, top_k=np.array([1, 1, 5]), temperature=np.array([1.5, 0.0, 0.0]), seed=np.array([1, 2, 3]))
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, V)).astype(np.float32))
    tokens = np.asarray(sample_jit(logits, jnp.zeros((3, V), jnp.int32), jnp.zeros(3, jnp.int32), s))
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))


def test_penalties_change_logits_exactly_as_defined():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, V)).astype(np.float32) * 3
    counts = rng.integers(0, 3, size=(2, V)).astype(np.int32)
    rep, freq, pres = np.array([1.3, 0.8], np.float32), np.array([0.5, 0.0], np.float32), np.array([0.0, 0.7], np.float32)
    s = batch(2, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts), s))
    seen = counts > 0
    expected = np.where(seen, np.where(logits > 0, logits / rep[:, None], logits * rep[:, None]), logits)
    expected = expected - freq[:, None] * counts - pres[:, None] * seen
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_penalties_steer_greedy_choice():
    logits = jnp.asarray(LOGITS)[None]
    counts = jnp.zeros((1, V), jnp.int32).at[0, 0].set(2)
    s = batch(1, frequency_penalty=1.0)
    assert int(sample_jit(logits, counts, jnp.zeros(1, jnp.int32), s)[0]) == 1  # 3.0 - 2 < 2.5


def test_min_tokens_masks_stop_ids_until_reached():
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (2, V))
    stop_ids = np.full((2, 4), -1, np.int32)
    stop_ids[:, 0] = 0  # the argmax is the eos id
    s = batch(2, min_tokens=3, stop_ids=stop_ids)
    tokens = np.asarray(sample_jit(logits, jnp.zeros((2, V), jnp.int32), jnp.array([2, 3], jnp.int32), s))
    assert tokens.tolist() == [1, 0]  # row 0 has 2 < 3 tokens: eos masked; row 1 reached min_tokens


def test_bitmask_allows_only_set_bits():
    allowed = [5, 9, 13]
    mask = np.zeros((1, 1), np.uint32)
    for t in allowed:
        mask[0, 0] |= np.uint32(1 << t)
    s = batch(64, bitmask=mask, top_k=0, seed=np.arange(64))
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (64, V))
    tokens = np.asarray(sample_jit(logits, jnp.zeros((64, V), jnp.int32), jnp.zeros(64, jnp.int32), s))
    assert set(tokens.tolist()) <= set(allowed) and len(set(tokens.tolist())) > 1


def test_same_seed_is_reproducible_and_batch_invariant():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, V)).astype(np.float32)
    s = batch(8, top_k=0, temperature=1.0, seed=np.arange(100, 108))
    zeros = jnp.zeros((8, V), jnp.int32)
    steps = jnp.arange(8, dtype=jnp.int32)
    full = np.asarray(sample_jit(jnp.asarray(logits), zeros, steps, s))
    again = np.asarray(sample_jit(jnp.asarray(logits), zeros, steps, s))
    np.testing.assert_array_equal(full, again)
    for row in (0, 5):
        alone = batch(1, top_k=0, temperature=1.0, seed=100 + row)
        tok = sample_jit(jnp.asarray(logits[row:row + 1]), zeros[:1], steps[row:row + 1], alone)
        assert int(tok[0]) == full[row]
    # a different position in the stream draws differently (not a constant per seed)
    draws = {int(sample_jit(jnp.asarray(logits[:1]), zeros[:1], jnp.array([n], jnp.int32),
                            batch(1, top_k=0, seed=7))[0]) for n in range(40)}
    assert len(draws) > 1


def _filter_by_bisection(logits, s):
    """filter_logits as it is defined: both thresholds by bisection, for every row."""
    from maxjax.runtime import sampler

    vocab = logits.shape[-1]
    logits = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    keys = sampler._sortable(logits)
    logits = jnp.where(keys >= sampler._kth_largest(keys, k)[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    p_min = jnp.maximum(sampler.top_p_threshold(probs, s.top_p), s.min_p * jnp.max(probs, axis=-1))
    return jnp.where(probs >= p_min[:, None], logits, -jnp.inf)


@pytest.mark.parametrize("top_k, top_p, min_p", [
    ([1, 3, 50, 64, 0, 5000], 1.0, 0.0),       # every k small or unlimited: lax.top_k
    ([1, 3, 50, 65, 0, 300], 1.0, 0.0),        # a k above 64: bisection
    ([0, 0, 5000, 0, 0, 0], 1.0, 0.0),         # no limit anywhere: both skipped
    ([0, 40, 0, 7, 0, 0], [0.9, 1.0, 0.5, 1.0, 0.3, 1.0], [0.0, 0.0, 0.1, 0.0, 0.0, 0.05]),
])
def test_filter_fast_paths_equal_the_bisections_exactly(top_k, top_p, min_p):
    """The batch-level fast paths (lax.top_k for small k, skipped passes) keep exactly the same tokens,
    with ties (logits rounded to one decimal over a 4096-token vocabulary) and -inf entries."""
    from maxjax.runtime.sampler import filter_logits

    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(0, 2, (6, 4096)), 1).astype(np.float32)
    logits[2, :100] = -np.inf
    logits[3, :40] = -0.0  # equal to the zeros among the rest
    arrays = empty_sampling(6, 4096, 4)
    arrays.update(top_k=np.asarray(top_k, np.int32) * np.ones(6, np.int32),
                  top_p=np.asarray(top_p, np.float32) * np.ones(6, np.float32),
                  min_p=np.asarray(min_p, np.float32) * np.ones(6, np.float32),
                  temperature=np.linspace(0.5, 1.5, 6).astype(np.float32))
    s = SamplingBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
    fast = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), s))
    np.testing.assert_array_equal(fast, np.asarray(jax.jit(_filter_by_bisection)(jnp.asarray(logits), s)))
    kept = np.isfinite(fast).sum(axis=1)
    assert kept[0] >= 1 and (kept[np.asarray(top_k) == 3] >= 3).all()


@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "xla"])
@pytest.mark.parametrize("vocab", [3000, 49152, 13])
def test_argmax_is_jnp_argmax_with_ties_and_infinities(native_kernel, vocab):
    """The native kernel (CPU) and the XLA form: the first index of the maximum, over a vocabulary that fills
    whole vectors or not; a row holding a NaN gives its first NaN's index (the native kernel; the XLA form's
    answer there is unspecified)."""
    from maxjax.kernels import native
    from maxjax.runtime.sampler import argmax

    x = np.round(np.random.default_rng(vocab).normal(0, 1, (6, vocab)), 1).astype(np.float32)  # many ties
    x[1] = -np.inf
    x[2, 7] = x[2, vocab - 2] = np.inf
    x[3, vocab - 1] = x[3].max() + 1  # the maximum in the last, partial vector
    x[4, 5] = x[4, 9] = np.nan
    with contextlib.nullcontext() if native_kernel else native.disabled():
        program = jax.jit(lambda logits: argmax(logits))  # a new function: no trace shared between the forms
        got = np.asarray(program(jnp.asarray(x)))
        batched = np.asarray(program(jnp.asarray(x.reshape(2, 3, vocab))))
        assert ("maxjax_argmax" in program.lower(jnp.asarray(x)).as_text()) == (
            native_kernel and native.ffi_target("maxjax_argmax") is not None)
    want = np.argmax(x, axis=-1)  # numpy: the first NaN too
    rows = slice(None) if native_kernel else [0, 1, 2, 3, 5]
    np.testing.assert_array_equal(got[rows], want[rows])
    np.testing.assert_array_equal(batched.reshape(-1)[rows], want[rows])
