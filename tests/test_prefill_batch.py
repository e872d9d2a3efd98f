"""Batched prefill: several new requests share one prefill call (rows grouped by program shape) and get the
same tokens and log-probabilities as when each is prefilled alone; nothing compiles after warm-up; the
default bucket policy fits short chat prompts."""

import jax
import numpy as np
import pytest

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig, bucket_for
from maxjax.runtime.engine import Engine

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
# Chunks of 8 and 32 tokens; a call holds up to 32 tokens: 4 rows of 8.
RUNTIME = RuntimeConfig(max_batch_size=8, max_seq_len=64, max_num_steps=4, length_buckets=(32, 64),
                        max_prefill_len=32, prefill_length_buckets=(8, 32), prefill_batch_buckets=(1, 4),
                        batch_buckets=(8,))


@pytest.fixture(scope="module")
def pipeline():
    params = llama.init_params(CFG, jax.random.key(3))
    pipe = TextGenerationPipeline(Engine(llama, CFG, dict(params, lm_head=params["lm_head"] * 8), RUNTIME))
    pipe.warmup()
    calls = []
    prefill = pipe.engine.prefill

    def recording_prefill(rows, sampling, kv_len):
        calls.append((rows["tokens"].shape, kv_len))
        return prefill(rows, sampling, kv_len)

    pipe.engine.prefill = recording_prefill
    pipe.prefill_calls = calls
    return pipe


def contexts(lengths, seed=0):
    """New requests: greedy, seeded sampling and log-probabilities (with echo) mixed over the rows."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate(lengths):
        prompt = rng.integers(4, CFG.vocab_size, size=n).astype(np.int32)
        params = SamplingParams(top_k=8, temperature=0.8, seed=i) if i % 3 == 1 else SamplingParams()
        logprobs = 3 if i % 3 == 2 else 0
        out[f"r{i}"] = TextContext(f"r{i}", prompt, max_length=n + 6, sampling_params=params,
                                   log_probabilities=logprobs, log_probabilities_echo=bool(logprobs))
    return out


def run(pipe, batch):
    """{request id: (tokens, log-probabilities)} of running ``batch`` to completion together."""
    tokens = {rid: [] for rid in batch}
    logprobs = {rid: [] for rid in batch}
    live = dict(batch)
    while live:
        for rid, out in pipe.next_token(TextGenerationInputs(dict(live), 4)).items():
            tokens[rid] += out.tokens
            logprobs[rid] += [(lp.token_log_probabilities, lp.top_log_probabilities)
                              for lp in out.log_probabilities or []]
            if out.is_done:
                pipe.release(rid)
                del live[rid]
    return {rid: (tokens[rid], logprobs[rid]) for rid in batch}


def test_batched_prefill_equals_one_at_a_time(pipeline):
    before = compile_count()
    lengths = [3, 7, 5, 8, 12, 16, 40, 2]  # 40 > max_prefill_len: chunked, alone in its calls
    pipeline.prefill_calls.clear()
    together = run(pipeline, contexts(lengths))
    batched = list(pipeline.prefill_calls)
    alone = {}
    for rid, ctx in contexts(lengths).items():
        alone.update(run(pipeline, {rid: ctx}))
    assert set(together) == set(alone)
    for rid in alone:
        assert together[rid][0] == alone[rid][0], rid
        for (lp_t, top_t), (lp_a, top_a) in zip(together[rid][1], alone[rid][1], strict=True):
            np.testing.assert_allclose(lp_t, lp_a, atol=2e-5)
            assert top_t[0].keys() == top_a[0].keys()
    # Rows 0-3 and 7 (<= 8 tokens) share calls of 4 and 1 (no padding rows); rows 4-5 (32-token chunks) run
    # alone; the long prompt runs its 32-token chunk at span 32, then its 8-token tail as an 8-token chunk at
    # span 64.
    assert sorted(batched) == sorted([((4, 8), 32), ((1, 8), 32)] + [((1, 32), 32)] * 3 + [((1, 8), 64)])
    assert compile_count() == before, "a batched prefill compiled after warm-up"
    assert pipeline.engine.num_programs == len(RUNTIME.prefill_shapes()) + len(RUNTIME.decode_shapes())
    assert pipeline.slots.num_free == RUNTIME.max_batch_size


def test_prefill_shapes_of_the_policy():
    assert RUNTIME.prefill_shapes() == [(1, 8, 32), (1, 8, 64), (1, 32, 32), (1, 32, 64), (4, 8, 32)]
    assert RUNTIME.prefill_shape(5, 5) == (8, 32)
    assert RUNTIME.prefill_shape(8, 40) == (8, 64)  # a short tail deep in the cache computes only its own chunk
    with pytest.raises(ValueError, match="prefill_length_buckets"):
        RuntimeConfig(max_seq_len=64, length_buckets=(32, 64), max_prefill_len=32, prefill_length_buckets=(8, 16))  # no 32


def test_default_policy_fits_short_prompts():
    """The default runtime (LLM, load_pipeline): a 64-token prompt is a 64-token chunk attending over 128
    positions, and its 64 new tokens decode over a 128 span, never 2048; short prompts share calls of 4."""
    config = RuntimeConfig()
    assert config.prefill_shape(64, 64) == (64, 128)
    assert config.prefill_shape(25, 25) == (32, 128)
    assert config.prefill_rows_per_call(64, 128) == (1, 4)
    assert bucket_for(64 + 64 - 1, config.length_buckets, "span") == 128
    assert config.prefill_shape(512, 512) == (512, 512) and config.prefill_rows_per_call(512, 512) == (1,)
    assert len(config.prefill_shapes()) == 14 and len(config.decode_shapes()) == 12
    assert RuntimeConfig(max_batch_size=1).prefill_batch_buckets == (1,)


def test_long_chunks_attend_in_query_blocks_with_the_same_result():
    """A 256-token chunk over a 2048 span attends in blocks of 128 queries: equal to all queries at once."""
    from maxjax.architectures import attention as attn

    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (1, 256, 4, 8))
    k, v = (jax.random.normal(key, (1, 2, 2048, 8)) for key in keys[1:])
    positions = 1000 + jax.numpy.arange(256)[None]  # a tail deep in the cache
    mask = attn.attention_mask(positions, 2048, None)
    blocked = jax.jit(attn.attention)(q, k, v, mask)
    whole = jax.jit(attn._attention, static_argnums=(4, 5))(q, k, v, mask, None, None)
    assert 256 * 2048 > attn._BLOCKED_SCORES and 256 > attn.QUERY_BLOCK
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-6, rtol=1e-6)


def test_end_aligned_chunks_attend_only_the_keys_they_can_see():
    """Prefill rows end at the chunk's last index, so a block of queries ending at t sees at most the first
    S - T + t + 1 keys: attention skips the rest (5/8 of the scores of a 256-chunk over its own span) and equals
    attention over every key, for a chunk from position 0, a short tail deep in the span and a padding row."""
    from maxjax.architectures import attention as attn

    T, S = 256, 256
    keys = jax.random.split(jax.random.key(6), 3)
    q = jax.random.normal(keys[0], (3, T, 4, 8))
    k, v = (jax.random.normal(key, (3, 2, S, 8)) for key in keys[1:])
    positions = np.full((3, T), -1, np.int32)
    positions[0] = np.arange(T)  # a whole chunk from 0
    positions[1, T - 10:] = np.arange(S - 10, S)  # 10 tokens ending the span, end-aligned
    mask = attn.attention_mask(jax.numpy.asarray(positions), S, None)
    causal = jax.jit(lambda *a: attn.attention(*a, end_aligned=True))(q, k, v, mask)
    whole = jax.jit(attn._attention, static_argnums=(4, 5))(q, k, v, mask, None, None)
    real = positions >= 0
    np.testing.assert_allclose(np.asarray(causal)[real], np.asarray(whole)[real], atol=1e-6, rtol=1e-6)

    def score_elements(end_aligned):
        jaxpr = jax.make_jaxpr(lambda *a: attn.attention(*a, end_aligned=end_aligned))(q, k, v, mask)
        return sum(np.prod(e.outvars[0].aval.shape) for e in jaxpr.eqns  # q @ k: [..., T, keys]; p @ v: [..., 8]
                   if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] != 8)

    assert score_elements(True) == score_elements(False) * 3 // 4  # blocks of 128: (128 + 256) / (2 * 256)


def test_prefill_rows_must_be_end_aligned(pipeline):
    """A chunk whose tokens start the row but sit deep in the span would see too few keys: refused."""
    from maxjax.runtime.engine import empty_prefill_rows, empty_sampling

    rows = empty_prefill_rows(1, 8, RUNTIME.pages_per_row(32))
    rows["positions"][0, :4] = np.arange(28, 32)  # token 0 at position 28 > 32 - 8 + 0
    with pytest.raises(ValueError, match="end-aligned"):
        pipeline.engine.prefill(rows, empty_sampling(1, CFG.vocab_size, RUNTIME.max_stop_ids), 32)


def test_long_prompt_prefill_matches_an_uncached_forward():
    """Chunks longer than the causal block (256 tokens, blocks of 128), the second one a tail deep in the
    cache: the first generated token's log-probabilities equal a plain forward over the whole prompt."""
    from maxjax.architectures import attention as attn

    runtime = RuntimeConfig(max_batch_size=1, max_seq_len=512, max_num_steps=1, length_buckets=(256, 512),
                            max_prefill_len=256, scan_decode_layers=True, scan_prefill_layers=True)
    params = llama.init_params(CFG, jax.random.key(4))
    params = dict(params, lm_head=params["lm_head"] * 8)
    pipe = TextGenerationPipeline(Engine(llama, CFG, params, runtime))
    assert 256 > attn.CAUSAL_BLOCK
    for n in (200, 300):  # one chunk at (256, 256); two: 256 at (256, 256), then 44 at (256, 512)
        prompt = np.random.default_rng(n).integers(4, CFG.vocab_size, size=n).astype(np.int32)
        ctx = TextContext(f"p{n}", prompt, max_length=n + 1, log_probabilities=1)
        out = pipe.next_token(TextGenerationInputs({ctx.request_id: ctx}, 1))[ctx.request_id]
        pipe.release(ctx.request_id)
        cache = llama.init_kv_cache(CFG, 1, 512)
        logits, _ = llama.forward(params, CFG, prompt[None], np.arange(n)[None], cache, np.zeros(1, np.int32),
                                  kv_len=512)
        reference = jax.nn.log_softmax(logits[0, -1])
        assert out.tokens == [int(np.argmax(reference))]
        np.testing.assert_allclose(out.log_probabilities[0].token_log_probabilities[0],
                                   float(reference[out.tokens[0]]), atol=1e-5)


def _reference_attention(q, k, v, mask, scale, cap):
    """Grouped-query attention in float64 numpy: softmax(q k^T * scale, soft-capped, masked) v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B, H, S, Dh]
    scores = np.einsum("bthd,bhsd->bhts", q, k) * scale
    if cap is not None:
        scores = np.tanh(scores / cap) * cap
    scores = np.where(np.asarray(mask)[:, None], scores, np.finfo(np.float64).min)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bhsd->bthd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("scale, cap", [(None, None), (0.3, 5.0)])
def test_attention_matches_a_float64_reference(scale, cap):
    """Prefill's causal blocks and decode's one-query form (softmax normalized after the product with v, the
    scale applied to q) against float64 numpy, for a chunk from position 0 and a short end-aligned tail."""
    from maxjax.architectures import attention as attn

    T, S, Dh = 256, 384, 8
    keys = jax.random.split(jax.random.key(7), 3)
    q = 3 * jax.random.normal(keys[0], (2, T, 6, Dh))
    k, v = (jax.random.normal(key, (2, 2, S, Dh)) for key in keys[1:])
    positions = np.full((2, T), -1, np.int32)
    positions[0] = np.arange(S - T, S)
    positions[1, T - 20:] = np.arange(S - 20, S)
    mask = attn.attention_mask(jax.numpy.asarray(positions), S, None)
    expected = _reference_attention(q, k, v, mask, Dh ** -0.5 if scale is None else scale, cap)
    real = positions >= 0
    causal = jax.jit(lambda *a: attn.attention(*a, scale, cap, end_aligned=True))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(causal)[real], expected[real], atol=2e-6, rtol=1e-5)
    one = jax.jit(lambda *a: attn.attention(*a, scale, cap))(q[:, -1:], k, v, mask[:, -1:])  # a decode step
    np.testing.assert_allclose(np.asarray(one)[:, 0], expected[:, -1], atol=2e-6, rtol=1e-5)


def test_prefill_computes_rope_angles_once(pipeline):
    """cos/sin of the rope angles equal float64 numpy's (longrope's factors included), and the compiled
    prefill program computes them once, not inside each layer's (and attention block's) Q and K rope."""
    import math

    from maxjax.architectures.rope import rope_cos_sin, rope_inv_freq

    positions = np.arange(-1, 5000, dtype=np.int32)[None, :, None]
    longrope = (("rope_type", "longrope"), ("factor", 4.0), ("original_max_position_embeddings", 4096),
                ("short_factor", (1.0,) * 4), ("long_factor", (1.5, 2.0, 3.0, 4.0)))
    for scaling in (None, longrope):
        short, long = (positions.astype(np.float32) * rope_inv_freq(1e4, 8, scaling, long=b) for b in (False, True))
        angles = np.where((positions >= 4096) & (scaling is not None), long, short).astype(np.float64)
        angles = np.concatenate([angles, angles], -1)
        factor = math.sqrt(1 + math.log(4.0) / math.log(4096)) if scaling else 1.0
        cos, sin = rope_cos_sin(1e4, 8, scaling, positions[..., 0])
        np.testing.assert_allclose(np.asarray(cos), np.cos(angles) * factor, atol=2e-6)
        np.testing.assert_allclose(np.asarray(sin), np.sin(angles) * factor, atol=2e-6)
    text = pipeline.engine.compiled_text("prefill", (1, 32, 32))
    assert CFG.num_layers == 2 and text.count(" cosine(") == 1 and text.count(" sine(") == 1
