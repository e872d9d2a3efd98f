"""The compiled runtime through the TokenGenerator protocol, on a tiny random Llama.

The reference is an uncached full forward recomputed for every token (`llama.forward` over the whole
sequence): independent of buckets, slots, chunking and the multi-step decode loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
RUNTIME = RuntimeConfig(max_batch_size=4, max_seq_len=128, max_num_steps=8, length_buckets=(32, 128),
                        max_prefill_len=32)
EOS = 3


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    # Larger output weights make greedy text vary instead of repeating one token.
    return dict(p, lm_head=p["lm_head"] * 8)


@pytest.fixture(scope="module")
def pipeline(params):
    pipe = TextGenerationPipeline(Engine(llama, CFG, params, RUNTIME))
    pipe.warmup()
    return pipe


@jax.jit
def _full_forward(params, tokens, positions):
    cache = llama.init_kv_cache(CFG, 1, RUNTIME.max_seq_len)
    logits, _ = llama.forward(params, CFG, tokens, positions, cache, jnp.zeros(1, jnp.int32),
                              kv_len=RUNTIME.max_seq_len)
    return logits


def reference_greedy(params, prompt, n, eos=None):
    """Greedy tokens by recomputing the whole sequence for every token (padded to one shape)."""
    tokens = list(prompt)
    out = []
    for _ in range(n):
        t = len(tokens)
        padded = np.zeros((1, RUNTIME.max_seq_len), np.int32)
        padded[0, :t] = tokens
        positions = np.where(np.arange(RUNTIME.max_seq_len) < t, np.arange(RUNTIME.max_seq_len), -1)[None]
        nxt = int(jnp.argmax(_full_forward(params, padded, positions)[0, t - 1]))
        if nxt == eos:
            break
        out.append(nxt)
        tokens.append(nxt)
    return out


def prompts(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, CFG.vocab_size, size=n).astype(np.int32) for n in lengths]


def context(rid, prompt, max_new=12, eos=(), **params):
    return TextContext(rid, prompt, max_length=len(prompt) + max_new, eos_token_ids=set(eos),
                       sampling_params=SamplingParams(**params))


def run_to_completion(pipe, contexts, num_steps, join=None):
    """Drives next_token until every context is done; `join` maps a call index to contexts joining then."""
    live, out, call = dict(contexts), {rid: [] for rid in contexts}, 0
    join = join or {}
    while live or any(k >= call for k in join):
        for ctx in join.pop(call, []):
            live[ctx.request_id] = ctx
            out[ctx.request_id] = []
        call += 1
        if not live:
            continue
        for rid, o in pipe.next_token(TextGenerationInputs(dict(live), num_steps)).items():
            assert len(o.tokens) <= num_steps
            out[rid] += o.tokens
            if o.is_done:
                pipe.release(rid)
                del live[rid]
    return out


@pytest.mark.parametrize("num_steps", [1, 8])
def test_greedy_batch_of_unequal_lengths_equals_reference(pipeline, params, num_steps):
    ps = prompts(3, 15, 40)  # 40 > max_prefill_len: chunked prefill
    out = run_to_completion(pipeline, {f"r{i}": context(f"r{i}", p) for i, p in enumerate(ps)}, num_steps)
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == reference_greedy(params, p, 12)
    assert pipeline.slots.num_free == RUNTIME.max_batch_size


def test_continuous_batching_matches_each_request_alone(pipeline, params):
    ps = prompts(5, 9, 20, 7, 30, seed=1)
    alone = {f"c{i}": run_to_completion(pipeline, {f"c{i}": context(f"c{i}", p, max_new=4 + 3 * i)}, 4)[f"c{i}"]
             for i, p in enumerate(ps)}
    first = {f"c{i}": context(f"c{i}", ps[i], max_new=4 + 3 * i) for i in range(3)}
    late = {1: [context("c3", ps[3], max_new=13)], 3: [context("c4", ps[4], max_new=16)]}
    together = run_to_completion(pipeline, first, 4, join=late)
    assert together == alone
    assert pipeline.slots.num_free == RUNTIME.max_batch_size


def test_eos_and_max_length_statuses(pipeline, params):
    p = prompts(6, seed=2)[0]
    expected = reference_greedy(params, p, 10)
    eos = expected[4]  # pretend the fifth generated token is eos
    ctx = context("e", p, max_new=10, eos=(eos,))
    outputs = []
    while not ctx.is_done:
        outputs.append(pipeline.next_token(TextGenerationInputs({"e": ctx}, 3))["e"])
    pipeline.release("e")
    tokens = [t for o in outputs for t in o.tokens]
    assert tokens == expected[:expected.index(eos)]
    assert outputs[-1].final_status == GenerationStatus.END_OF_SEQUENCE
    assert all(o.final_status == GenerationStatus.ACTIVE for o in outputs[:-1])
    ctx = context("m", p, max_new=5)
    out = pipeline.next_token(TextGenerationInputs({"m": ctx}, 8))["m"]
    pipeline.release("m")
    assert out.tokens == expected[:5] and out.final_status == GenerationStatus.MAXIMUM_LENGTH


def test_chunked_prefill_equals_one_large_bucket(params, pipeline):
    p = prompts(50, seed=3)[0]
    big = TextGenerationPipeline(Engine(llama, CFG, params, RuntimeConfig(
        max_batch_size=1, max_seq_len=128, max_num_steps=8, length_buckets=(64, 128), max_prefill_len=64)))
    chunked = run_to_completion(pipeline, {"x": context("x", p)}, 8)["x"]
    whole = run_to_completion(big, {"x": context("x", p)}, 8)["x"]
    assert chunked == whole == reference_greedy(params, p, 12)


def test_seeded_sampling_is_batch_invariant(pipeline):
    ps = prompts(4, 11, 17, seed=4)
    params = dict(top_k=20, temperature=0.9, top_p=0.95)
    alone = run_to_completion(pipeline, {"s1": context("s1", ps[1], seed=7, **params)}, 8)
    mixed = run_to_completion(pipeline, {
        "s0": context("s0", ps[0], seed=1, **params),
        "s1": context("s1", ps[1], seed=7, **params),
        "s2": context("s2", ps[2], repetition_penalty=1.3, frequency_penalty=0.5)}, 8)
    assert mixed["s1"] == alone["s1"]
    other_seed = run_to_completion(pipeline, {"s1": context("s1", ps[1], seed=8, **params)}, 8)
    assert other_seed["s1"] != alone["s1"]


def test_no_compiles_after_warmup_over_a_mixed_workload(pipeline):
    before = compile_count()
    ps = prompts(1, 31, 33, 45, 100, seed=5)
    mixes = [
        ({"a": context("a", ps[0], max_new=20)}, 1),
        ({"b": context("b", ps[1], max_new=9, top_k=5, temperature=0.7, seed=3),
          "c": context("c", ps[2], max_new=3, min_new_tokens=2, eos=(5,))}, 7),
        ({"d": context("d", ps[3], max_new=25, presence_penalty=0.4),
          "e": context("e", ps[4], max_new=27, top_p=0.5, top_k=0, seed=9)}, 8),
    ]
    for contexts, steps in mixes:
        run_to_completion(pipeline, contexts, steps)
    ctx = TextContext("lp", ps[1], max_length=len(ps[1]) + 10, log_probabilities=3)
    run_to_completion(pipeline, {"lp": ctx, "plain": context("plain", ps[0])}, 5)
    assert compile_count() == before
    assert pipeline.engine.num_programs == len(RUNTIME.prefill_shapes()) + len(RUNTIME.decode_shapes())


def test_bad_inputs_fail_clearly_and_the_next_call_works(pipeline, params):
    p = prompts(5, seed=6)[0]
    too_long = TextContext("long", p, max_length=RUNTIME.max_seq_len + 1)
    good = context("good", p, max_new=4)
    with pytest.raises(ValueError, match="max_length"):
        pipeline.next_token(TextGenerationInputs({"good": good, "long": too_long}, 2))
    assert pipeline.slots.num_free == RUNTIME.max_batch_size and not good.is_assigned_to_cache
    with pytest.raises(ValueError, match="num_steps"):
        pipeline.next_token(TextGenerationInputs({"good": good}, RUNTIME.max_num_steps + 1))
    with pytest.raises(ValueError, match="unknown request_id"):
        pipeline.release("nobody")
    with pytest.raises(ValueError, match="token ids"):
        pipeline.next_token(TextGenerationInputs({"v": context("v", np.array([1, CFG.vocab_size]))}, 1))
    crowd = {f"q{i}": context(f"q{i}", p) for i in range(RUNTIME.max_batch_size + 1)}
    with pytest.raises(ValueError, match="free KV cache slots"):
        pipeline.next_token(TextGenerationInputs(crowd, 1))
    with pytest.raises(ValueError, match="request_id"):
        pipeline.next_token(TextGenerationInputs({"other": good}, 1))
    assert pipeline.slots.num_free == RUNTIME.max_batch_size
    assert run_to_completion(pipeline, {"good": good}, 2)["good"] == reference_greedy(params, p, 4)


@pytest.mark.parametrize("fields, match", [
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(length_buckets=(64, 32, 128), max_seq_len=128), "increasing"),
    (dict(length_buckets=(16, 64), max_seq_len=128), "largest"),
    (dict(max_prefill_len=48, length_buckets=(16, 32, 128), max_seq_len=128), "max_prefill_len"),
    (dict(dtype="float16"), "dtype"),
])
def test_invalid_runtime_config(fields, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**fields)
