"""The paged KV cache: the host page pool (reference counts, prefix index, LRU eviction), and through the
TokenGenerator protocol on a tiny random Llama: pages give the same tokens as one page per sequence, prefix
caching gives the same outputs as computing everything, exhaustion is refused before anything changes, and
``LLM`` preempts instead of failing."""

import jax
import numpy as np
import pytest

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
from maxjax.runtime.kv_pages import KVCacheFull, PagePool, PageTable, page_keys

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
RUNTIME = RuntimeConfig(max_batch_size=4, max_seq_len=128, max_num_steps=8, length_buckets=(32, 128),
                        max_prefill_len=32, page_size=8, num_pages=96)


# ---- the host pool ------------------------------------------------------------------------------------------

def test_pool_counts_references_and_evicts_the_least_recently_used_cached_page():
    pool = PagePool(4, page_size=2)
    a, b = pool.allocate(2)
    keys = page_keys(np.arange(4), 2)
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.lookup(keys) == [a, b] and pool.lookup(page_keys(np.array([0, 1, 9, 9]), 2)) == [a]
    pool.acquire([a])  # a second holder
    pool.release([a, b])
    assert pool.num_used == 1 and pool.num_available == 3 and pool.is_idle(b) and not pool.is_idle(a)
    pool.release([a])
    c, d, e = pool.allocate(3)  # two free pages, then the least recently idle one (b)
    assert {c, d} == {2, 3} and e == b and pool.lookup(keys) == [a]
    with pytest.raises(KVCacheFull, match="needs 2 more pages but has 1 available"):
        pool.allocate(2)


def test_page_table_shares_full_prompt_pages_and_never_the_last_token():
    table = PageTable(PagePool(16, page_size=4))
    prompt = np.arange(10, dtype=np.int32)
    assert table.admit("a", prompt) == (0, None)
    table.reserve("a", 10)
    table.commit("a", prompt)  # two full pages registered
    assert table.admit("b", prompt) == (8, None) and table.pages_of("b") == table.pages_of("a")[:2]
    assert table.admit("c", prompt[:8]) == (4, None)  # its last token is on page 2: only page 1 is shared
    assert table.admit("d", prompt, salt="adapter") == (0, None)  # another adapter: other K/V
    assert table.admit("e", prompt, use_cache=False) == (0, None)
    for rid in "abcde":
        table.release(rid)
    assert table.pool.num_used == 0 and table.pool.num_cached == 2


def test_a_released_requests_partial_page_is_continued_by_a_copy():
    table = PageTable(PagePool(8, page_size=4))
    chat = np.arange(10, dtype=np.int32)  # a finished turn: 10 tokens written, the last page holds 2
    table.admit("turn1", chat)
    table.reserve("turn1", 10)
    table.commit("turn1", chat)
    first_pages = table.pages_of("turn1")
    table.release("turn1", written=chat)
    cached, copy = table.admit("turn2", np.concatenate([chat, [50, 51, 52]]))  # the next turn
    assert cached == 10 and copy == (first_pages[2], table.pages_of("turn2")[2])
    assert table.pages_of("turn2")[:2] == first_pages[:2] and copy[1] not in first_pages
    assert table.admit("other", np.concatenate([chat[:9], [7, 7, 7]]))[0] == 9  # 8 + one matching token
    assert table.admit("last", chat[:10])[0] == 9  # never the prompt's last token


# ---- through the protocol -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    return dict(p, lm_head=p["lm_head"] * 8)  # greedy text that varies


def make_pipeline(params, **fields):
    return TextGenerationPipeline(Engine(llama, CFG, params, RuntimeConfig(**{**RUNTIME.__dict__, **fields})))


@pytest.fixture(scope="module")
def pipeline(params):
    pipe = make_pipeline(params)
    pipe.warmup()
    return pipe


def run(pipe, prompts, max_new=12, num_steps=4, **sampling):
    contexts = {f"r{i}": TextContext(f"r{i}", np.asarray(p, np.int32), max_length=120,
                                     sampling_params=SamplingParams(max_new_tokens=max_new, **sampling))
                for i, p in enumerate(prompts)}
    out = {rid: [] for rid in contexts}
    live = dict(contexts)
    while live:
        for rid, o in pipe.next_token(TextGenerationInputs(dict(live), num_steps)).items():
            out[rid] += o.tokens
            if o.is_done:
                pipe.release(rid)
                del live[rid]
    return [out[rid] for rid in contexts]


PROMPTS = [list(range(5, 45)), list(range(5, 45)) + [7, 8, 9], [11] * 3, list(range(60, 100))[::-1]]


def test_pages_give_the_tokens_of_one_page_per_sequence(params, pipeline):
    one_page = make_pipeline(params, page_size=128, num_pages=4, prefix_caching=False)
    assert run(pipeline, PROMPTS) == run(one_page, PROMPTS)
    assert pipeline.engine.pool.num_used == 0


def test_prefix_caching_gives_the_same_outputs_and_skips_the_shared_prefix(params, pipeline):
    plain = make_pipeline(params, prefix_caching=False)
    seeded = dict(top_k=20, temperature=0.9, seed=5)
    for sampling in ({}, seeded):
        assert run(pipeline, PROMPTS, **sampling) == run(plain, PROMPTS, **sampling)
    pool = pipeline.engine.pool
    hits = pool.hit_tokens
    run(pipeline, [list(range(5, 45)) + [1, 2]])  # 40 shared tokens: 5 pages of 8
    assert pool.hit_tokens - hits >= 40
    assert plain.engine.pool.hit_tokens == 0


def test_requests_joining_together_share_the_prefix_the_first_computes(params):
    pipe = make_pipeline(params)
    shared = list(range(20, 60))
    prompts = [shared + [i] for i in range(3)]
    before = pipe.engine.pool.hit_tokens
    outputs = run(pipe, prompts)
    assert pipe.engine.pool.hit_tokens - before == 2 * 40  # the 2nd and 3rd reuse the 1st's 5 pages
    assert outputs == run(make_pipeline(params, prefix_caching=False), prompts)


def test_the_next_turn_continues_the_last_turns_pages_with_the_same_outputs(params, pipeline):
    plain = make_pipeline(params, prefix_caching=False)
    first = [list(range(5, 30))]
    reply = run(pipeline, first, max_new=9)[0]
    assert reply == run(plain, first, max_new=9)[0]
    second = [first[0] + reply + [60, 61, 62]]  # the conversation so far and a new message
    pool = pipeline.engine.pool
    hits = pool.hit_tokens
    assert run(pipeline, second) == run(plain, second)
    assert pool.hit_tokens - hits == 25 + 9 - 1  # every token written before: full pages and the partial one


def test_echo_with_prefix_caching_computes_the_prompt(params, pipeline):
    def echo(pipe):
        ctx = TextContext("e", np.arange(5, 45, dtype=np.int32), max_length=60, log_probabilities=2,
                          log_probabilities_echo=True, sampling_params=SamplingParams(max_new_tokens=3))
        out = pipe.next_token(TextGenerationInputs({"e": ctx}, 4))["e"]
        pipe.release("e")
        return [(lp.token_log_probabilities, lp.top_log_probabilities) for lp in out.log_probabilities]

    run(pipeline, [list(range(5, 45))])  # the prompt's pages are cached now
    plain = make_pipeline(params, prefix_caching=False)
    np.testing.assert_allclose([v for v, _ in echo(pipeline)], [v for v, _ in echo(plain)], atol=1e-5)


def test_a_call_short_of_pages_changes_nothing(params):
    pipe = make_pipeline(params, num_pages=8)  # 64 positions
    ctxs = {f"r{i}": TextContext(f"r{i}", np.arange(3, 30, dtype=np.int32), max_length=120) for i in range(3)}
    with pytest.raises(KVCacheFull, match="may need 15 more KV cache pages but 8 are available"):
        pipe.next_token(TextGenerationInputs(ctxs, 8))
    assert pipe.engine.pool.num_used == 0 and pipe.slots.num_free == 4
    assert all(ctx.start_idx == 0 and not ctx.is_assigned_to_cache for ctx in ctxs.values())
    with pytest.raises(ValueError, match="its 70 tokens need 9 KV cache pages, more than the whole pool"):
        pipe.next_token(TextGenerationInputs({"long": TextContext("long", np.arange(70) % 100 + 3,
                                                                  max_length=120)}, 1))


def test_llm_preempts_when_pages_run_out_and_gives_the_same_text(params):
    from maxjax.pipelines.kv_admission import set_aside

    big, small = make_pipeline(params), make_pipeline(params, num_pages=12)
    prompts = [list(range(3 + i, 30 + i)) for i in range(3)]
    expected = run(big, prompts, max_new=40)

    contexts = {f"r{i}": TextContext(f"r{i}", np.asarray(p, np.int32), max_length=120,
                                     sampling_params=SamplingParams(max_new_tokens=40)) for i, p in enumerate(prompts)}
    out = {rid: [] for rid in contexts}
    waiting, active, room, preempted = list(contexts), {}, 4, 0
    while waiting or active:  # the LLM loop (pipelines/llm.py) with its set-aside rule
        while waiting and len(active) < room:
            rid = waiting.pop(0)
            active[rid] = contexts[rid]
        try:
            outputs = small.next_token(TextGenerationInputs(dict(active), 4))
        except KVCacheFull:
            rid = set_aside(small, active)
            preempted += small.pages.holds(rid) is False and contexts[rid].num_generated > 0
            del active[rid]
            waiting.insert(0, rid)
            room = len(active)
            continue
        for rid, o in outputs.items():
            out[rid] += o.tokens
            if o.is_done:
                small.release(rid)
                del active[rid]
                room = 4
    assert [out[rid] for rid in contexts] == expected
    assert preempted and small.pages.preemptions == preempted
    assert small.engine.pool.num_used == 0


def test_prefix_hits_compile_nothing_after_warmup(pipeline):
    before = compile_count()
    run(pipeline, [list(range(5, 45)) + [3, 3], list(range(5, 45)) * 2])
    assert compile_count() == before


def test_the_pallas_kernels_give_the_tokens_of_the_xla_path(params, pipeline, monkeypatch):
    """The GPU path (Pallas paged attention), run in interpret mode on the CPU: prefill chunks and decode steps
    attend by the Pallas kernels, sliding-window and soft-capped families included elsewhere (test_pallas_attention)."""
    monkeypatch.setenv("MAXJAX_PALLAS_INTERPRET", "1")
    monkeypatch.setenv("MAXJAX_NATIVE_KERNELS", "0")
    pallas = make_pipeline(params)
    prompts = [PROMPTS[0], PROMPTS[2]]
    assert run(pallas, prompts, max_new=6) == run(pipeline, prompts, max_new=6)


def test_clearing_the_cache_frees_idle_pages_and_keeps_held_ones_private():
    table = PageTable(PagePool(8, page_size=2))
    prompt = np.arange(6, dtype=np.int32)
    for rid in ("a", "b"):
        table.admit(rid, prompt)
        table.reserve(rid, 6)
        table.commit(rid, prompt)
    table.release("a")
    table.pool.clear_cache()  # e.g. a LoRA adapter was loaded: a name may now mean other weights
    assert table.pool.num_cached == 0 and table.admit("c", prompt) == (0, None)
    table.release("b")
    table.release("c")
    assert table.pool.num_available == 8 and table.pool.num_used == 0


@pytest.mark.parametrize("kv_dtype, bound", [("bfloat16", 0.05), ("float8_e4m3fn", 0.5)])
def test_a_narrower_kv_cache_dtype_stays_near_float32(params, pipeline, kv_dtype, bound):
    """K/V stored in bfloat16 / float8 (read back in float32): the first token's log-probabilities move by at
    most ``bound`` (bfloat16 keeps 8 mantissa bits, float8_e4m3 3), and the pool holds 2x / 4x the positions
    in the same bytes."""
    def logprobs(pipe):
        ctx = TextContext("lp", np.arange(5, 45, dtype=np.int32), max_length=60, log_probabilities=3,
                          sampling_params=SamplingParams(max_new_tokens=4))
        out = pipe.next_token(TextGenerationInputs({"lp": ctx}, 4))["lp"]
        pipe.release("lp")
        return np.array(list(out.log_probabilities[0].top_log_probabilities[0].values()))  # the first token's

    narrow = make_pipeline(params, kv_cache_dtype=kv_dtype)
    assert narrow.engine.cache.k.dtype == np.dtype(kv_dtype)
    assert narrow.engine.kv_cache_bytes * (4 // np.dtype(kv_dtype).itemsize) == pipeline.engine.kv_cache_bytes
    assert np.abs(logprobs(narrow) - logprobs(pipeline)).max() < bound
