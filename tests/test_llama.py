"""Llama architecture on tiny random configs: numpy reference, padding, chunked prefill + decode, slots, donation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import unavailable

from maxjax.architectures import llama

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False)


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len"))
def _forward(params, cfg, tokens, positions, cache, slots, kv_len):
    return llama.forward(params, cfg, tokens, positions, cache, slots, kv_len=kv_len)


def _run(params, cfg, tokens, positions=None, cache=None, slots=None, kv_len=None, max_seq_len=32):
    tokens = np.asarray(tokens, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if cache is None:
        cache = llama.init_kv_cache(cfg, tokens.shape[0], max_seq_len, params["embed"].dtype)
    if slots is None:
        slots = np.arange(tokens.shape[0], dtype=np.int32)
    logits, cache = _forward(params, cfg, tokens, np.asarray(positions, np.int32), cache,
                             np.asarray(slots, np.int32), kv_len or cache.k.shape[3])
    return np.asarray(logits), cache


def _reference(params, cfg, tokens, inv=None):
    """Plain numpy float64 Llama over one unpadded sequence, written independently of the model code; ``inv``:
    the rotary inverse frequencies (default: unscaled, from rope_theta)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    T = len(tokens)
    H, KVH, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.rms_norm_eps)

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, Dh, 2) / Dh) if inv is None else inv
    ang = np.arange(T)[:, None] * inv[None]  # [T, Dh/2]

    def rot(x):  # x [T, heads, Dh], rotate-half
        x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    i, j = np.arange(T)[:, None], np.arange(T)[None]
    allowed = j <= i
    if cfg.sliding_window:
        allowed &= j > i - cfg.sliding_window
    x = p["embed"][tokens]
    for n in range(cfg.num_layers):
        lp = {k: v[n] for k, v in p["layers"].items()}
        h = norm(x, lp["attn_norm"])
        q = rot((h @ lp["wq"]).reshape(T, H, Dh))
        k = np.repeat(rot((h @ lp["wk"]).reshape(T, KVH, Dh)), H // KVH, axis=1)
        v = np.repeat((h @ lp["wv"]).reshape(T, KVH, Dh), H // KVH, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)
        s = np.where(allowed[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * Dh) @ lp["wo"]
        h = norm(x, lp["mlp_norm"])
        g = h @ lp["w_gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ lp["w_up"])) @ lp["w_down"]
    x = norm(x, p["final_norm"])
    return x @ (p["embed"].T if cfg.tie_word_embeddings else p["lm_head"])


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.key(0))


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy_reference(tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    params = llama.init_params(cfg, jax.random.key(1))
    tokens = _tokens(11)
    logits, _ = _run(params, cfg, tokens[None])
    np.testing.assert_allclose(logits[0], _reference(params, cfg, tokens), atol=2e-5, rtol=0)


def test_sliding_window_matches_reference_and_masks():
    cfg = dataclasses.replace(CFG, sliding_window=4)
    params = llama.init_params(cfg, jax.random.key(2))
    tokens = _tokens(12, seed=3)
    logits, _ = _run(params, cfg, tokens[None])
    np.testing.assert_allclose(logits[0], _reference(params, cfg, tokens), atol=2e-5, rtol=0)
    # Outside the window the model must differ from full attention (the window really masks).
    full, _ = _run(params, CFG, tokens[None])
    assert np.abs(full[0, :4] - logits[0, :4]).max() < 1e-6  # within the window: identical
    assert np.abs(full[0, 6:] - logits[0, 6:]).max() > 1e-3


def _llama3_inv_freq(theta, dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's rope scaling, from its published formula: wavelengths below original / high_freq_factor kept,
    above original / low_freq_factor divided by factor, and a smooth blend between."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * np.pi / inv
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return np.where(wavelen < original_max_position_embeddings / high_freq_factor, inv,
                    np.where(wavelen > original_max_position_embeddings / low_freq_factor, inv / factor, blended))


@pytest.mark.parametrize("kv_heads", [1, 2])  # one K/V head for all 4 query heads (MQA), and 2 for 2 each
def test_gqa_and_llama3_rope_scaling_match_the_reference(kv_heads):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = dataclasses.replace(CFG, rope_scaling=scaling, num_kv_heads=kv_heads)
    assert isinstance(cfg.rope_scaling, tuple) and hash(cfg)
    inv = np.asarray(llama.rope_inv_freq(cfg))
    expected = _llama3_inv_freq(CFG.rope_theta, CFG.head_dim, **{k: v for k, v in scaling.items() if k != "rope_type"})
    # head_dim 8: wavelengths 6.3 (kept), 63 (blended), 628 and 6283 (divided by 8)
    np.testing.assert_allclose(inv, expected, rtol=1e-6)
    assert inv[0] == expected[0] and not np.isclose(inv[1], expected[1] / 8) and np.isclose(inv[-1], expected[-1])
    params = llama.init_params(cfg, jax.random.key(5))
    assert params["layers"]["wk"].shape[-1] == kv_heads * cfg.head_dim
    tokens = _tokens(24, seed=6)
    logits, _ = _run(params, cfg, tokens[None])
    np.testing.assert_allclose(logits[0], _reference(params, cfg, tokens, inv=expected), atol=2e-5, rtol=0)
    # and the scaling matters: the unscaled reference is further off than the tolerance
    assert np.abs(logits[0] - _reference(params, cfg, tokens)).max() > 1e-4


def test_padding_does_not_change_real_rows(params):
    a, b = _tokens(7, 4), _tokens(3, 5)
    alone_a, _ = _run(params, CFG, a[None])
    alone_b, _ = _run(params, CFG, b[None])
    tokens = np.zeros((2, 8), np.int32)
    positions = np.full((2, 8), -1, np.int32)
    tokens[0, :7], positions[0, :7] = a, np.arange(7)
    tokens[1, :3], positions[1, :3] = b, np.arange(3)
    tokens[1, 3:] = 17  # pad contents must not matter
    batched, cache = _run(params, CFG, tokens, positions)
    np.testing.assert_allclose(batched[0, :7], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched[1, :3], alone_b[0], atol=1e-5, rtol=0)
    assert np.isfinite(batched).all()
    # Padding wrote nothing: row 1's cache beyond position 2 is still zero.
    assert np.all(np.asarray(cache.k)[:, 1, :, 3:] == 0) and np.all(np.asarray(cache.v)[:, 1, :, 3:] == 0)


def test_chunked_prefill_then_decode_equals_full_forward(params):
    tokens = _tokens(12, 6)
    full, _ = _run(params, CFG, tokens[None])
    cache = llama.init_kv_cache(CFG, 1, 32)
    chunk1, cache = _run(params, CFG, tokens[None, :5], np.arange(5)[None], cache, kv_len=16)
    # Second chunk padded from 6 to 8 on the right.
    chunk_tokens = np.concatenate([tokens[5:11], [0, 0]])[None]
    chunk_pos = np.array([[5, 6, 7, 8, 9, 10, -1, -1]])
    chunk2, cache = _run(params, CFG, chunk_tokens, chunk_pos, cache, kv_len=16)
    step, cache = _run(params, CFG, tokens[None, 11:12], np.array([[11]]), cache, kv_len=16)
    np.testing.assert_allclose(chunk1[0], full[0, :5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(chunk2[0, :6], full[0, 5:11], atol=1e-5, rtol=0)
    np.testing.assert_allclose(step[0, 0], full[0, 11], atol=1e-5, rtol=0)


def test_rows_use_their_own_slots(params):
    a, b = _tokens(6, 7), _tokens(6, 8)
    cache = llama.init_kv_cache(CFG, 3, 16)
    both = np.stack([a[:5], b[:5]])
    pos = np.broadcast_to(np.arange(5), (2, 5))
    _, cache = _run(params, CFG, both, pos, cache, slots=[2, 0])
    assert np.all(np.asarray(cache.k)[:, 1] == 0)  # slot 1 untouched
    # Decode only b (slot 0), in a batch of one.
    step, _ = _run(params, CFG, b[None, 5:6], np.array([[5]]), cache, slots=[0], kv_len=8)
    full_b, _ = _run(params, CFG, b[None])
    np.testing.assert_allclose(step[0, 0], full_b[0, 5], atol=1e-5, rtol=0)


def test_bfloat16_runs_and_tracks_float32(params):
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = _tokens(9, 9)
    logits16, cache = _run(params16, CFG, tokens[None])
    assert cache.k.dtype == jnp.bfloat16 and logits16.dtype == np.float32
    logits32, _ = _run(jax.tree.map(lambda a: a.astype(jnp.float32), params16), CFG, tokens[None])
    scale = np.abs(logits32).max()
    assert np.abs(logits16 - logits32).max() < 0.05 * scale


def test_donated_cache_is_updated_in_place(params):
    step = jax.jit(functools.partial(llama.forward, cfg=CFG, kv_len=16), donate_argnames=("cache",))
    cache = llama.init_kv_cache(CFG, 8, 1024)
    tokens = jnp.asarray(_tokens(8)[None], jnp.int32)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    slots = jnp.zeros((1,), jnp.int32)
    compiled = step.lower(params, tokens=tokens, positions=positions, cache=cache, pages=slots).compile()
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    # The outputs alias the donated cache and no temporary is as large as it (the scan carries it).
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == cache_bytes
    assert memory.temp_size_in_bytes < cache.k.nbytes // 8
    before = cache.k.unsafe_buffer_pointer()
    _, new_cache = step(params, tokens=tokens, positions=positions, cache=cache, pages=slots)
    assert cache.k.is_deleted()
    assert new_cache.k.unsafe_buffer_pointer() == before
    assert cache_bytes == new_cache.k.nbytes * 2


def test_unstacked_layers_give_the_same_logits(params):
    tokens = _tokens(10, 11)
    stacked, cache_a = _run(params, CFG, tokens[None])
    unstacked, cache_b = _run(llama.unstack_layers(params), CFG, tokens[None])
    np.testing.assert_allclose(unstacked, stacked, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache_b.k), np.asarray(cache_a.k), atol=1e-6, rtol=0)


def test_runtime_layout_of_a_tied_model_reads_a_transposed_output_projection(monkeypatch):
    """The serving layout keeps the tied embedding for lookups and, on the CPU, adds its [D, V] transpose for the
    logits (a faster XLA CPU dot); logits stay those of the tied model, and quantized embeddings are left tied. (Without
    the native kernels, whose panel packing of the same copy `tests/test_native_kernels.py` covers.)"""
    from maxjax.kernels import native
    from maxjax.weights.quantize import quantize_params, weight_bytes

    monkeypatch.setenv(native.ENABLE_ENV, "0")
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    params = llama.init_params(cfg, jax.random.key(3))
    runtime = llama.runtime_params(params)
    tokens = _tokens(9, 5)
    logits, _ = _run(runtime, cfg, tokens[None])
    np.testing.assert_allclose(logits[0], _reference(params, cfg, tokens), atol=2e-5, rtol=0)
    # What a decode step reads: the projection, not the embedding beside it.
    assert weight_bytes(runtime) == weight_bytes(llama.fuse_projections(params))
    assert "lm_head" not in llama.untie_output(quantize_params(params, "int8"))
    if jax.default_backend() != "cpu":  # GPU/TPU dots read either layout at full speed: no copy is made
        assert "lm_head" not in runtime
        return
    np.testing.assert_array_equal(np.asarray(runtime["lm_head"]), np.asarray(params["embed"]).T)
    hidden = jax.ShapeDtypeStruct((4, cfg.hidden_size), jnp.float32)
    text = jax.jit(functools.partial(llama.lm_head, cfg=cfg)).lower(runtime, hidden=hidden).as_text()
    assert "contracting_dims = [1] x [0]" in text and "contracting_dims = [1] x [1]" not in text  # [D, V] read


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are XLA:CPU custom calls; other "
                    "backends keep the weights unpacked for XLA's dots")
def test_runtime_layout_packs_float32_weights_for_the_native_matmul():
    """On the CPU every float32 linear weight and the output projection are packed into column panels, each
    layer's four products run as the native kernel, and the logits are the float64 reference's."""
    from maxjax.architectures import panels

    if panels.native.ffi_target(panels.TARGET) is None:
        unavailable("no C++ compiler: the native matmul is unavailable (tests/test_native_kernels.py says why)")
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    params = llama.init_params(cfg, jax.random.key(4))
    runtime = llama.runtime_params(params)
    packed = [k for layer in runtime["layers"] for k, w in layer.items() if panels.is_panels(w)]
    assert sorted(packed) == sorted(["wqkv", "wo", "w_gate_up", "w_down"] * cfg.num_layers)
    np.testing.assert_array_equal(np.asarray(panels.unpack(runtime["lm_head"])), np.asarray(params["embed"]).T)
    tokens = _tokens(9, 6)
    logits, _ = _run(runtime, cfg, tokens[None])
    np.testing.assert_allclose(logits[0], _reference(params, cfg, tokens), atol=2e-5, rtol=0)
    hidden = jax.ShapeDtypeStruct((4, cfg.hidden_size), jnp.float32)
    text = jax.jit(functools.partial(llama.lm_head, cfg=cfg)).lower(runtime, hidden=hidden).compile().as_text()
    assert panels.TARGET in text and " dot(" not in text
