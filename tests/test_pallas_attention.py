"""The Pallas paged-attention kernels (maxjax.kernels.pallas_attention), run in interpret mode on the CPU, against
their pure-jnp references and the model's own XLA attention: shuffled non-contiguous block tables, rows of
different lengths (empty, partial, a full table), a sliding start, soft cap on and off, float32 and bfloat16
caches. Also that they lower for the GPU (Triton), which needs no GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require

from maxjax.architectures.attention import attention
from maxjax.kernels import pallas_attention as pa
from maxjax.kernels.paged import gather_pages

B, H, KVH, PS, P, L = 3, 4, 2, 16, 4, 2
NUM_PAGES = 16  # more than the B * P the rows use: some pages belong to no row
SCALE = 0.125
STARTS = np.array([0, 5, 20], np.int32)  # row 2 slides: it sees from position 20 on
LENGTHS = np.array([0, 37, P * PS], np.int32)  # empty, partial (3 pages), the full table
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _cache(dtype, Dh, seed=0):
    """(cache_k, cache_v [L, NUM_PAGES, KVH, PS, Dh], pages [B, P]) with each row's pages shuffled over the pool."""
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((L, NUM_PAGES, KVH, PS, Dh)), dtype)
    v = jnp.asarray(rng.standard_normal((L, NUM_PAGES, KVH, PS, Dh)), dtype)
    pages = jnp.asarray(rng.permutation(NUM_PAGES)[:B * P].reshape(B, P), jnp.int32)
    return k, v, pages


def _queries(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype,Dh,softcap,pages_per_block,splits", [
    (jnp.float32, 64, None, 1, 1),
    (jnp.float32, 64, 5.0, 2, 1),
    (jnp.float32, 64, None, 1, 3),
    (jnp.bfloat16, 64, 5.0, 2, 2),
    (jnp.float32, 128, 30.0, 1, 1),
])
def test_decode_matches_reference(dtype, Dh, softcap, pages_per_block, splits):
    k, v, pages = _cache(dtype, Dh)
    q = _queries((B, H, Dh))
    starts, lengths = jnp.asarray(STARTS), jnp.asarray(LENGTHS)
    out, lse = pa.paged_decode_attention(q, k, v, 1, pages, starts, lengths, scale=SCALE, softcap=softcap,
                                         pages_per_block=pages_per_block, splits=splits, interpret=True)
    ref_out, ref_lse = pa.paged_decode_attention_reference(q, k, v, 1, pages, starts, lengths, scale=SCALE,
                                                           softcap=softcap)
    assert out.shape == (B, H, Dh) and out.dtype == jnp.float32 and lse.shape == (B, H)
    _close(out, ref_out, dtype)
    _close(lse[1:], ref_lse[1:], dtype)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # row 0 sees nothing: 0, lse very negative, finite
    assert np.all(np.isfinite(np.asarray(lse))) and np.all(np.asarray(lse[0]) <= -1e29)


def test_decode_traced_layer():
    k, v, pages = _cache(jnp.float32, 64)
    q = _queries((B, H, 64))
    starts, lengths = jnp.asarray(STARTS), jnp.asarray(LENGTHS)

    @jax.jit
    def decode(layer):  # the layer index as a scanned layer body has it
        return pa.paged_decode_attention(q, k, v, layer, pages, starts, lengths, scale=SCALE, interpret=True)

    for layer in range(L):
        out, lse = decode(jnp.int32(layer))
        ref_out, ref_lse = pa.paged_decode_attention_reference(q, k, v, layer, pages, starts, lengths, scale=SCALE)
        _close(out, ref_out, jnp.float32)
        _close(lse, ref_lse, jnp.float32)


def test_decode_reads_only_visible_pages():
    """Pages no row sees hold NaN: a kernel that read (and masked) them would return NaN, so finite outputs equal
    to the clean cache's show that cost follows each row's real span [start, length)."""
    k, v, pages = _cache(jnp.float32, 64)
    q = _queries((B, H, 64))
    starts, lengths = jnp.asarray(STARTS), jnp.asarray(LENGTHS)
    table = np.asarray(pages)
    seen = {int(table[b, p]) for b in range(B) for p in range(P)
            if p * PS < LENGTHS[b] and (p + 1) * PS > STARTS[b]}
    poison = np.array([p not in seen for p in range(NUM_PAGES)])[None, :, None, None, None]
    k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    for splits in (1, 3):
        out, lse = pa.paged_decode_attention(q, k_nan, v_nan, 0, pages, starts, lengths, scale=SCALE,
                                             pages_per_block=1, splits=splits, interpret=True)
        ref_out, ref_lse = pa.paged_decode_attention_reference(q, k, v, 0, pages, starts, lengths, scale=SCALE)
        _close(out, ref_out, jnp.float32)
        _close(lse[1:], ref_lse[1:], jnp.float32)


@pytest.mark.parametrize("dtype,softcap", [(jnp.float32, None), (jnp.float32, 5.0), (jnp.bfloat16, None)])
def test_merge_new_key_is_attention_with_the_key(dtype, softcap):
    """The decode output merged with the current token's own key == plain softmax over the cache keys and it."""
    Dh = 64
    k, v, pages = _cache(dtype, Dh)
    q = _queries((B, H, Dh))
    k_new, v_new = _queries((B, KVH, Dh), seed=2), _queries((B, KVH, Dh), seed=3)
    starts, lengths = jnp.asarray(STARTS), jnp.asarray(LENGTHS)
    out, lse = pa.paged_decode_attention(q, k, v, 0, pages, starts, lengths, scale=SCALE, softcap=softcap,
                                         pages_per_block=2, interpret=True)
    merged = pa.merge_new_key(out, lse, q, k_new, v_new, scale=SCALE, softcap=softcap)

    # Independent dense reference: gathered keys with the new one appended as key S, visible to every row.
    S = P * PS
    keys = jnp.concatenate([gather_pages(k, 0, pages, S).astype(jnp.float32), k_new[:, :, None]], axis=2)
    values = jnp.concatenate([gather_pages(v, 0, pages, S).astype(jnp.float32), v_new[:, :, None]], axis=2)
    j = jnp.arange(S + 1)
    mask = ((j >= starts[:, None]) & (j < lengths[:, None])) | (j == S)  # [B, S + 1]
    qg = q.astype(dtype).astype(jnp.float32).reshape(B, KVH, H // KVH, 64)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, keys, precision="highest") * SCALE
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    weights = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
    expected = jnp.einsum("bkgs,bksd->bkgd", weights, values, precision="highest").reshape(B, H, Dh)
    _close(merged, expected, dtype)
    _close(merged[0], jnp.repeat(v_new[0], H // KVH, axis=0), jnp.float32)  # row 0: the new key alone


def _chunk_positions(T):
    """Row 0 a prefill from 0; row 1 a chunk from 30 with two padding queries; row 2 ending at the table's last
    position (its whole table in view)."""
    return jnp.asarray(np.stack([np.arange(T), np.r_[np.arange(30, 30 + T - 2), [-1, -1]],
                                 np.arange(P * PS - T, P * PS)]), jnp.int32)


@pytest.mark.parametrize("dtype,Dh,softcap,window,pages_per_block,block_q", [
    (jnp.float32, 64, None, None, 1, 8),
    (jnp.float32, 64, 5.0, 20, 2, None),
    (jnp.bfloat16, 64, None, 5, 1, 8),
    (jnp.float32, 128, 30.0, None, 2, 8),
])
def test_chunk_matches_reference(dtype, Dh, softcap, window, pages_per_block, block_q):
    T = 12  # with block_q 8: two query blocks, the second one padded
    k, v, pages = _cache(dtype, Dh)
    q = _queries((B, T, H, Dh))
    positions = _chunk_positions(T)
    kwargs = dict(scale=SCALE, softcap=softcap, sliding_window=window)
    out = pa.paged_chunk_attention(q, k, v, 1, pages, positions, block_q=block_q, pages_per_block=pages_per_block,
                                   interpret=True, **kwargs)
    ref = pa.paged_chunk_attention_reference(q, k, v, 1, pages, positions, **kwargs)
    assert out.shape == (B, T, H, Dh) and out.dtype == jnp.float32
    real = np.asarray(positions) >= 0
    _close(np.asarray(out)[real], np.asarray(ref)[real], dtype)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("window", [None, 5])
def test_chunk_reads_only_visible_pages(window):
    """As for decode: pages past each row's last query position (the causal future) and before its first query's
    window hold NaN, and the outputs stay equal to the clean cache's."""
    T = 12
    k, v, pages = _cache(jnp.float32, 64)
    q = _queries((B, T, H, 64))
    positions = _chunk_positions(T)
    pos, table = np.asarray(positions), np.asarray(pages)
    seen = set()
    for b in range(B):
        real = pos[b][pos[b] >= 0]
        lo = 0 if window is None else max(real.min() - window + 1, 0)
        seen |= {int(table[b, p]) for p in range(lo // PS, real.max() // PS + 1)}
    poison = np.array([p not in seen for p in range(NUM_PAGES)])[None, :, None, None, None]
    assert poison.sum() > NUM_PAGES - B * P  # some of the rows' own pages are poisoned too
    out = pa.paged_chunk_attention(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), 0, pages,
                                   positions, scale=SCALE, sliding_window=window, pages_per_block=1, block_q=8,
                                   interpret=True)
    ref = pa.paged_chunk_attention_reference(q, k, v, 0, pages, positions, scale=SCALE, sliding_window=window)
    _close(np.asarray(out)[pos >= 0], np.asarray(ref)[pos >= 0], jnp.float32)


@pytest.mark.parametrize("logit_cap", [None, 30.0])
def test_kernels_match_model_attention(logit_cap):
    """Both kernels against `maxjax.architectures.attention.attention` over the gathered keys (float32)."""
    Dh, T, S = 64, 12, P * PS
    k, v, pages = _cache(jnp.float32, Dh)
    keys, values = gather_pages(k, 1, pages, S), gather_pages(v, 1, pages, S)
    j = jnp.arange(S)

    positions = _chunk_positions(T)
    q = _queries((B, T, H, Dh))
    mask = j[None, None, :] <= positions[:, :, None]
    expected = attention(q, keys, values, mask, SCALE, logit_cap)
    out = pa.paged_chunk_attention(q, k, v, 1, pages, positions, scale=SCALE, softcap=logit_cap, interpret=True)
    real = np.asarray(positions) >= 0
    _close(np.asarray(out)[real], np.asarray(expected)[real], jnp.float32)

    qd = _queries((B, H, Dh), seed=4)
    starts, lengths = jnp.asarray(STARTS), jnp.asarray(LENGTHS)
    mask = ((j >= starts[:, None]) & (j < lengths[:, None]))[:, None]  # [B, 1, S]
    expected = attention(qd[:, None], keys, values, mask, SCALE, logit_cap)[:, 0]
    out, _ = pa.paged_decode_attention(qd, k, v, 1, pages, starts, lengths, scale=SCALE, softcap=logit_cap,
                                       interpret=True)
    _close(out[1:], expected[1:], jnp.float32)  # row 0 sees nothing: the model's attention gives a uniform mean


def test_kernels_lower_for_gpu():
    """Both kernels go through Pallas' Triton lowering (power-of-two blocks, supported ops) for a CUDA target,
    which needs no GPU: what is left to a real GPU is Triton's own compilation and the run."""
    require("jax.experimental.pallas.triton")
    from jax import export
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    spec = jax.ShapeDtypeStruct
    cache = spec((L, NUM_PAGES, KVH, PS, 128), jnp.bfloat16)
    table, rows = spec((B, P), jnp.int32), spec((B,), jnp.int32)
    decode = functools.partial(pa.paged_decode_attention, scale=SCALE, softcap=30.0, splits=2, interpret=False)
    chunk = functools.partial(pa.paged_chunk_attention, scale=SCALE, sliding_window=5, interpret=False)
    for fn, args in ((decode, (spec((B, H, 128), jnp.bfloat16), cache, cache, spec((), jnp.int32), table, rows,
                               rows)),
                     (chunk, (spec((B, 12, H, 128), jnp.bfloat16), cache, cache, 0, table, spec((B, 12), jnp.int32)))):
        module = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
        assert "__gpu$xla.gpu.triton" in module


def test_pallas_backend(monkeypatch):
    monkeypatch.delenv("MAXJAX_PALLAS_INTERPRET", raising=False)
    assert pa.pallas_backend() == (jax.default_backend() == "gpu")
    monkeypatch.setenv("MAXJAX_PALLAS_INTERPRET", "1")
    assert pa.pallas_backend()
