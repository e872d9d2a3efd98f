"""The native CPU kernels (``maxjax/kernels/native``): the panel matmul against float64 numpy, the in-place
decode attention, the chunk attention and the cache write against the XLA form, and how maxjax falls back to XLA's
ops without them. The serving layout that packs weights for the matmul: tests/test_llama.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import unavailable

from maxjax.architectures import attention, llama, panels
from maxjax.architectures.rope import apply_rope, rope_cos_sin
from maxjax.kernels import native, paged


NOT_CPU = "the native kernels are XLA:CPU custom calls (jax.ffi, platform cpu); GPU/TPU run XLA's ops and Pallas"


@pytest.fixture(scope="module")
def kernel():
    if jax.default_backend() != "cpu":
        pytest.skip(NOT_CPU)
    if panels.native.ffi_target(panels.TARGET) is None:
        unavailable("the native matmul could not be built (is there a C++ compiler?)")
    return jax.jit(panels.panel_matmul)


@pytest.mark.parametrize("k, n", [(576, 960), (37, 64), (1536, 32)])
def test_panel_matmul_matches_float64(kernel, k, n):
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    packed = panels.pack(w)
    assert packed["panels"].shape == (n // 32, k, 32)
    np.testing.assert_array_equal(panels.unpack(packed), w)
    for lead in [(1,), (2,), (7,), (8,), (9,), (33,), (2, 5)]:  # register blocks of 8 rows, their remainders
        x = rng.standard_normal((*lead, k)).astype(np.float32)
        out = np.asarray(kernel(x, packed))
        assert out.shape == (*lead, n)
        np.testing.assert_allclose(out, x.astype(np.float64) @ w.astype(np.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k, f", [(576, 1536), (37, 32)])
def test_silu_glu_matmul_matches_float64(kernel, k, f):
    """The fused gate|up product with SwiGLU's activation in its epilogue (what ``llama_blocks.gated_mlp`` runs)."""
    rng = np.random.default_rng(k + f)
    gate, up = ((rng.standard_normal((k, f)) / np.sqrt(k)).astype(np.float64) for _ in range(2))
    packed = panels.pack(np.concatenate([gate, up], axis=1).astype(np.float32))
    assert panels.silu_glu_fusable(packed)
    for rows in (1, 9, 70):  # a decode row, a register block and its remainder, a prefill call (thread pool)
        x = rng.standard_normal((rows, k))
        g = x @ gate
        expected = g / (1 + np.exp(-g)) * (x @ up)
        got = np.asarray(jax.jit(panels.panel_matmul, static_argnums=4)(x.astype(np.float32), packed, None, None, True))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_panel_matmul_fuses_the_norm_and_the_residual(kernel, offset):
    """RMSNorm before the product (Gemma's offset too) and a residual after it, as `llama.decoder_layer` asks."""
    rng = np.random.default_rng(int(offset))
    k, n = 200, 64
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    weight = rng.standard_normal(k).astype(np.float32)
    for rows in (1, 5, 70):
        x = (3 * rng.standard_normal((rows, k))).astype(np.float32)
        residual = rng.standard_normal((rows, n)).astype(np.float32)
        x64 = x.astype(np.float64)
        normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-5) * (offset + weight)
        got = jax.jit(lambda x, r: panels.panel_matmul(x, panels.pack(w), (weight, 1e-5, offset), r))(x, residual)
        np.testing.assert_allclose(np.asarray(got), residual + normed @ w, atol=2e-5, rtol=0)
        # the XLA ops give the same
        np.testing.assert_allclose(np.asarray(got), residual + llama.rms_norm(x, weight, 1e-5, offset) @ w,
                                   atol=2e-5, rtol=0)


def test_only_float32_weights_with_whole_panels_are_packed():
    assert panels.packable(np.zeros((8, 64), np.float32))
    assert not panels.packable(np.zeros((8, 48), np.float32))  # 48 columns: not whole panels
    assert not panels.packable(np.zeros((8, 64), np.float16))
    assert not panels.packable({"int8": np.zeros((1, 64, 8), np.int8)})


_PROBE = """
import jax
from maxjax.architectures import llama, panels
cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8)
runtime = llama.runtime_params(llama.init_params(cfg, jax.random.key(0)))
print(sum(panels.is_panels(w) for w in runtime["layers"][0].values()))
"""


@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/c++", "PATH": "/nonexistent"}, {native.ENABLE_ENV: "0"}])
def test_without_the_kernel_weights_stay_for_xla_dots(tmp_path, env):
    """No compiler (nothing to build with, an empty cache) or MAXJAX_NATIVE_KERNELS=0: no weight is packed."""
    environ = dict(os.environ, MAXJAX_COMPILE_CACHE=str(tmp_path), JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0"


def _block_tables(rng, B, P, num_pages, share=True):
    """Block tables [B, P] of distinct pages shuffled over a pool of ``num_pages`` (not in order, not
    contiguous); with ``share``, row 1's first page is row 0's (a shared prompt prefix, read by both)."""
    pages = rng.permutation(num_pages)[:B * P].reshape(B, P).astype(np.int32)
    if share:
        pages[1, 0] = pages[0, 0]
    return jnp.asarray(pages)


def _decode_case(pages, positions, span, window, heads, kv_heads, head_dim, page_size, num_pages, scale, cap,
                 rotated_here, seed, layers=2):
    """The native decode attention and XLA's form (`gather_pages`, `with_new_key`, `attention`) of the same
    rows: -> (got, new k, new v, expected, k rotated, v)."""
    B = positions.shape[0]
    rng = np.random.default_rng(seed)
    cache_k, cache_v = (jnp.asarray(rng.standard_normal((layers, num_pages, kv_heads, page_size, head_dim)),
                                    jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, 1, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, 1, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    cos, sin = rope_cos_sin(10000.0, head_dim, None, positions)  # [B, 1, Dh]
    q_rotated, k_rotated = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = attention.hide_current(attention.attention_mask(positions, span, window), positions)  # [B, 1, S]
    table = paged.block_table(pages)
    keys, values = (paged.gather_pages(c, 1, table, span) for c in (cache_k, cache_v))
    keys, values, full_mask = attention.with_new_key(keys, values, mask, positions, k_rotated, v)
    with native.disabled():
        expected = attention.attention(q_rotated, keys, values, full_mask, scale, cap)
    joined = (q, k, v) if rotated_here else (q_rotated, k_rotated, v)
    qkv = jnp.concatenate([a.reshape(B, 1, -1) for a in joined], axis=-1)  # [B, 1, (H + 2 KVH) Dh]
    got, new_k, new_v = jax.jit(attention.decode_attention_in_place, static_argnums=(3, 8, 9))(
        qkv, cache_k, cache_v, 1, pages, positions, mask, (cos, sin) if rotated_here else None, scale, cap)
    return got, new_k, new_v, expected, k_rotated, v


@pytest.mark.parametrize("rotated_here", [True, False], ids=["rotated-in-kernel", "rotated-before"])
@pytest.mark.parametrize("heads, kv_heads, head_dim, scale, cap", [(9, 3, 64, None, None), (4, 4, 20, 0.3, 5.0)])
def test_decode_attention_in_place_matches_the_xla_form(kernel, heads, kv_heads, head_dim, scale, cap,
                                                        rotated_here):
    """One page of max_len positions per row (the slot layout, ``pages`` [B]): rows on scattered slots at
    different lengths, one a padding row (position -1, sees nothing), grouped heads, an even head size that is
    not whole vectors, a scale and a soft cap: from q | k | v the same output as `apply_rope`, `with_new_key` and
    `attention`, and the new rotated k and v (for the deferred write)."""
    slots = jnp.array([3, 0, 4, 1], jnp.int32)
    positions = jnp.array([[5], [31], [0], [-1]], jnp.int32)
    got, new_k, new_v, expected, k_rotated, v = _decode_case(
        slots, positions, 32, None, heads, kv_heads, head_dim, 40, 5, scale, cap, rotated_here, heads)
    np.testing.assert_allclose(np.asarray(got)[:3], np.asarray(expected)[:3], atol=2e-6, rtol=0)
    assert np.isfinite(np.asarray(got)).all()  # the padding row too
    np.testing.assert_allclose(np.asarray(new_k), np.asarray(k_rotated), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(new_v), np.asarray(v))


@pytest.mark.parametrize("heads, kv_heads, head_dim, page_size, window, cap", [
    (9, 3, 64, 16, None, None),  # SmolLM2's heads on pages of 16
    (9, 3, 64, 24, 19, None),    # pages that are not whole vectors of keys, a sliding window across pages
    (4, 2, 20, 16, 8, 5.0),      # the generic head size, a soft cap, a window inside one page
    (2, 1, 128, 24, None, None),
])
def test_paged_decode_attention_matches_the_xla_form(kernel, heads, kv_heads, head_dim, page_size, window, cap):
    """Rows of different lengths over shuffled block tables of 5 pages (row 1 sharing row 0's first page), a
    span that ends inside a page, a row at position 0 (no cache key: its new key alone), a padding row, table
    entries past a row's length that name no page (never read): XLA's form over the pages gathered."""
    P, B = 5, 6
    span = 4 * page_size + 5
    num_pages = B * P + 3
    rng = np.random.default_rng(page_size + head_dim)
    pages = np.array(_block_tables(rng, B, P, num_pages))
    positions = np.array([[span - 1], [page_size + 3], [2 * page_size], [0], [-1], [3 * page_size - 1]], np.int32)
    pages[5, 3:] = -1  # past row 5's last position: unallocated
    got, new_k, new_v, expected, k_rotated, v = _decode_case(
        jnp.asarray(pages), jnp.asarray(positions), span, window, heads, kv_heads, head_dim, page_size, num_pages,
        None, cap, True, page_size)
    real = positions[:, 0] >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=2e-6, rtol=0)
    assert np.isfinite(np.asarray(got)).all()  # the padding row too
    np.testing.assert_allclose(np.asarray(new_k), np.asarray(k_rotated), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(new_v), np.asarray(v))


def test_paged_decode_attention_rejects_a_page_out_of_range(kernel):
    positions = jnp.array([[20], [3]], jnp.int32)
    pages = jnp.array([[0, 5], [1, 2]], jnp.int32)  # row 0 reads its second page: there are 4
    with pytest.raises(Exception, match="page out of the cache's range"):
        jax.block_until_ready(_decode_case(pages, positions, 32, None, 2, 1, 16, 16, 4, None, None, True, 0)[0])


@pytest.mark.parametrize("heads, kv_heads, head_dim, span, chunk, scale", [
    (9, 3, 64, 512, 512, None),  # SmolLM2's heads: a whole-prompt prefill chunk
    (4, 2, 80, 77, 37, 0.3),     # a span and a chunk that are not whole tiles, Dh not a multiple of 32
    (2, 2, 128, 40, 1, None),    # one query
])
def test_chunk_attention_matches_the_xla_form(kernel, heads, kv_heads, head_dim, span, chunk, scale):
    """Prefill chunks that end their span (the causal prefix skipped per query tile), one row's chunk with
    padding queries (position -1: sees nothing, the uniform average of all S values) and a row under a random
    mask: the same output as XLA's form over the whole span."""
    rng = np.random.default_rng(span + chunk)
    B = 3
    q = jnp.asarray(rng.standard_normal((B, chunk, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, kv_heads, span, head_dim)), jnp.float32) for _ in range(2))
    positions = np.broadcast_to(np.arange(span - chunk, span, dtype=np.int32), (B, chunk)).copy()
    positions[1, chunk // 2:] = -1
    mask = np.array(attention.attention_mask(jnp.asarray(positions), span, None))
    mask[2] = rng.random((chunk, span)) < 0.3
    with native.disabled():
        expected = attention.attention(q, k, v, jnp.asarray(mask), scale)
    got = jax.jit(attention.attention, static_argnums=(4, 5, 6))(q, k, v, jnp.asarray(mask), scale, None, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)  # summation order
    assert "maxjax_chunk_attention" in jax.jit(attention.attention, static_argnums=(4, 5, 6)).lower(
        q, k, v, jnp.asarray(mask), scale, None, True).as_text()


def _chunk_case(pages, positions, span, heads, kv_heads, head_dim, page_size, num_pages, scale, seed,
                random_row=None, layers=3):
    """The native chunk attention over the pages, from the fused projection (rotated in the kernel) and from q
    rotated beforehand, and XLA's form over the keys gathered: -> (from projection, from rotated, expected)."""
    B, chunk = positions.shape
    rng = np.random.default_rng(seed)
    cache_k, cache_v = (jnp.asarray(rng.standard_normal((layers, num_pages, kv_heads, page_size, head_dim)),
                                    jnp.float32) for _ in range(2))
    qkv = jnp.asarray(rng.standard_normal((B, chunk, (heads + 2 * kv_heads) * head_dim)), jnp.float32)
    mask = attention.attention_mask(positions, span, None)
    if random_row is not None:
        mask = mask.at[random_row].set(jnp.asarray(rng.random((chunk, span)) < 0.3))
    cos, sin = rope_cos_sin(10000.0, head_dim, None, positions)  # [B, T, Dh]
    q = apply_rope(qkv[..., :heads * head_dim].reshape(B, chunk, heads, head_dim), cos, sin)
    table = paged.block_table(pages)
    with native.disabled():
        expected = attention.attention(q, paged.gather_pages(cache_k, 1, table, span),
                                       paged.gather_pages(cache_v, 1, table, span), mask, scale)
    in_place = jax.jit(attention.chunk_attention_in_place, static_argnums=(7, 8))
    from_projection = in_place(qkv, cache_k, cache_v, jnp.int32(1), pages, mask, (cos, sin), scale, heads)
    from_rotated = in_place(q.reshape(B, chunk, -1), cache_k, cache_v, jnp.int32(1), pages, mask, None, scale,
                            heads)
    return from_projection, from_rotated, expected


@pytest.mark.parametrize("heads, kv_heads, head_dim, max_len, chunk, scale", [
    (9, 3, 64, 96, 40, None),  # SmolLM2's heads, a chunk after earlier positions in the cache
    (4, 2, 16, 50, 7, 0.3),    # a span and a chunk that are not whole tiles
])
def test_chunk_attention_in_place_reads_the_cache_and_rotates_q(kernel, heads, kv_heads, head_dim, max_len, chunk,
                                                                 scale):
    """One page of max_len positions per row (the slot layout, ``pages`` [B]), from a fused q | k | v projection
    and the cache itself (scattered slots, a traced layer index, one row with padding queries): the output of
    `apply_rope` and XLA's attention over the keys copied out; and from q rotated beforehand (rotation None) the
    same."""
    span = max_len - 8
    positions = np.broadcast_to(np.arange(span - chunk, span, dtype=np.int32), (3, chunk)).copy()
    positions[1, :chunk // 2] = -1  # a row whose prompt is shorter than the chunk: padding first
    from_projection, from_rotated, expected = _chunk_case(
        jnp.array([2, 0, 3], jnp.int32), jnp.asarray(positions), span, heads, kv_heads, head_dim, max_len, 4, scale,
        chunk)
    for got in (from_projection, from_rotated):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)  # summation order


@pytest.mark.parametrize("heads, kv_heads, head_dim, page_size, chunk", [
    (9, 3, 64, 16, 40),  # SmolLM2's heads on pages of 16, a chunk of whole and partial query tiles
    (9, 3, 64, 24, 23),  # pages that are not whole vectors (nor blocks) of keys
    (4, 2, 16, 16, 7),
    (2, 1, 32, 24, 1),   # one query
])
def test_paged_chunk_attention_matches_the_xla_form(kernel, heads, kv_heads, head_dim, page_size, chunk):
    """Shuffled block tables of 5 pages (row 1 sharing row 0's first page), rows whose chunks end at different
    positions (one short: padding first, one in the middle of the span), a span ending inside a page, one row
    under a random mask, a traced layer: XLA's form over the pages gathered, from the projection and from q
    rotated beforehand."""
    P, B = 5, 4
    span = 4 * page_size + 5
    num_pages = B * P + 3
    rng = np.random.default_rng(page_size + chunk)
    pages = _block_tables(rng, B, P, num_pages)
    positions = np.stack([np.arange(span - chunk, span), np.arange(page_size + 2, page_size + 2 + chunk),
                          np.arange(span - chunk - 9, span - 9), np.arange(span - chunk, span)]).astype(np.int32)
    positions[1, :chunk // 2] = -1  # a row whose prompt is shorter than the chunk: padding first
    from_projection, from_rotated, expected = _chunk_case(pages, jnp.asarray(positions), span, heads, kv_heads,
                                                          head_dim, page_size, num_pages, None, chunk,
                                                          random_row=3)
    for got in (from_projection, from_rotated):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)  # summation order


def _write_case(pages, positions, kv_heads, head_dim, page_size, num_pages, seed, layers=3):
    """The native write of a chunk's k (rotated) and v from the fused projection into donated caches, and
    `paged.write_pages` of `apply_rope`'s k and of v: -> (got, expected) caches."""
    B, chunk = positions.shape
    heads = 2 * kv_heads
    rng = np.random.default_rng(seed)
    caches = [rng.standard_normal((layers, num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
              for _ in range(2)]
    qkv = jnp.asarray(rng.standard_normal((B, chunk, (heads + 2 * kv_heads) * head_dim)), jnp.float32)
    cos, sin = rope_cos_sin(10000.0, head_dim, None, positions)
    k_col, v_col = heads * head_dim, (heads + kv_heads) * head_dim
    k = apply_rope(qkv[..., k_col:v_col].reshape(B, chunk, kv_heads, head_dim), cos, sin)
    v = qkv[..., v_col:].reshape(B, chunk, kv_heads, head_dim)
    table = paged.block_table(pages)
    expected = [paged.write_pages(jnp.asarray(c), jnp.int32(1), new, table, positions)
                for c, new in zip(caches, (k, v))]
    write = jax.jit(attention.write_projection_in_place, donate_argnums=(0, 1))
    got = write(jnp.asarray(caches[0]), jnp.asarray(caches[1]), jnp.int32(1), qkv, (cos, sin), pages, positions)
    return got, expected


@pytest.mark.parametrize("kv_heads, head_dim, chunk", [(3, 64, 70), (2, 16, 5)])
def test_cache_write_from_the_projection_matches_the_scatter(kernel, kv_heads, head_dim, chunk):
    """One page of max_len positions per row (the slot layout, ``pages`` [B]): the native write of a chunk's k
    (rotated) and v from the fused projection, in place in the donated caches, gives the caches of
    `paged.write_pages` (scattered slots, a traced layer, padding positions and one past the cache, which write
    nothing), with nothing else touched."""
    max_len = 80
    positions = np.broadcast_to(np.arange(max_len - chunk, max_len, dtype=np.int32), (3, chunk)).copy()
    positions[1, :chunk // 2] = -1
    positions[2, -1] = max_len
    got, expected = _write_case(jnp.array([2, 0, 3], jnp.int32), jnp.asarray(positions), kv_heads, head_dim,
                                max_len, 4, chunk)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=0)  # the rotation's rounding


@pytest.mark.parametrize("kv_heads, head_dim, page_size, chunk", [(3, 64, 16, 70), (2, 16, 24, 5), (1, 32, 16, 1)])
def test_paged_cache_write_matches_the_scatter(kernel, kv_heads, head_dim, page_size, chunk):
    """Chunks written across page boundaries through shuffled block tables (rows starting at different
    positions, padding, positions past the table, which write nothing, and unallocated table entries past a
    row's positions): `paged.write_pages`'s caches, nothing else touched."""
    P, B = 4, 3
    num_pages = B * P + 2
    rng = np.random.default_rng(page_size + chunk)
    pages = np.array(_block_tables(rng, B, P, num_pages, share=False))
    end = P * page_size
    positions = np.stack([np.arange(end - chunk, end), np.arange(3, 3 + chunk),
                          np.arange(page_size - chunk // 2, page_size - chunk // 2 + chunk)]).astype(np.int32)
    positions[1, :chunk // 2] = -1
    positions[0, -1] = end  # one past the table
    positions = np.where(positions >= end, end, positions)
    used = -(-(positions[2].max() + 1) // page_size)
    pages[2, used:] = -1  # unallocated: no position of row 2 is written there
    got, expected = _write_case(jnp.asarray(pages), jnp.asarray(positions), kv_heads, head_dim, page_size,
                                num_pages, chunk)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=0)  # the rotation's rounding


def test_paged_cache_write_rejects_a_page_out_of_range(kernel):
    positions = jnp.array([[0, 17]], jnp.int32)
    with pytest.raises(Exception, match="page out of the cache's range"):
        got, _ = _write_case(jnp.array([[1, 7]], jnp.int32), positions, 1, 16, 16, 4, 0)
        jax.block_until_ready(got)


def test_soft_capped_attention_keeps_the_xla_form(kernel):
    q = jnp.zeros((1, 4, 2, 16), jnp.float32)
    k = v = jnp.zeros((1, 2, 8, 16), jnp.float32)
    mask = jnp.ones((1, 4, 8), bool)
    text = jax.jit(attention.attention, static_argnums=(4, 5)).lower(q, k, v, mask, None, 5.0).as_text()
    assert "maxjax_chunk_attention" not in text
