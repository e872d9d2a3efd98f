"""Speculative decoding through the TokenGenerator protocol.

Tiny random Llamas here (fast): greedy output identical with and without speculation, the sampled output's
distribution against the exact target distribution (chi-square, from an uncached full forward), a
deliberately bad drafter, zero compiles after warm-up, and bad configurations. Real SmolLM2 in
tests/test_speculative_real.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import require

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.drafters import DraftModelDrafter, NgramDrafter, ngram_draft
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

CFG = llama.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
RUNTIME = RuntimeConfig(max_batch_size=8, max_seq_len=64, max_num_steps=4, length_buckets=(64,),
                        batch_buckets=(8,), prefill_batch_buckets=(8,), max_prefill_len=64, max_logprobs=2,
                        speculative="ngram", num_speculative_tokens=3)
PROMPT = np.array([5, 9, 2, 17, 30, 11, 5, 9, 2, 17, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 31, 0, 1, 3,
                   7, 13, 15, 19, 21, 23, 25, 27, 29], np.int32)  # repeats, and every token of the vocabulary


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(1))
    return dict(p, lm_head=p["lm_head"] * 10)  # a peaked but not degenerate distribution


@pytest.fixture(scope="module")
def engine(params):
    engine = Engine(llama, CFG, params, RUNTIME)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def draft_engine(params):
    """A different random model with the same vocabulary: a poor drafter (most drafts are rejected)."""
    other = llama.init_params(CFG, jax.random.key(7))
    engine = Engine(llama, CFG, dict(other, lm_head=other["lm_head"] * 10),
                    dataclasses.replace(RUNTIME, speculative=None))
    engine.warmup()
    return engine


def plain(engine):
    pipeline = TextGenerationPipeline(engine)
    pipeline.speculative = None  # the same programs without speculation: the reference
    return pipeline


class BadDrafter:
    """Proposes uniformly random tokens: nearly always wrong, often outside top-k."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def propose(self, work):
        return [self.rng.integers(0, CFG.vocab_size, k).astype(np.int32) for _, k in work]

    def release(self, request_id):
        pass


def contexts(prompts, max_new=20, **params):
    return {f"r{i}": TextContext(f"r{i}", p, max_length=RUNTIME.max_seq_len,
                                 sampling_params=SamplingParams(max_new_tokens=max_new, **params))
            for i, p in enumerate(prompts)}


def test_ngram_draft_continues_the_latest_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], np.int32)
    assert ngram_draft(tokens, 3).tolist() == [7, 8, 5]  # the trigram "1 2 3" is gone: "2 3" matches last at 5
    assert ngram_draft(np.array([4, 5, 6], np.int32), 2).size == 0


def _prompts(seed):
    rng = np.random.default_rng(seed)
    return [PROMPT[:12], rng.integers(0, CFG.vocab_size, 9), np.tile(PROMPT[:3], 3), rng.integers(0, 32, 14)]


def test_greedy_identical_with_ngram_and_draft_model(engine, draft_engine, run_requests):
    prompts = _prompts(0)
    reference = run_requests(plain(engine), contexts(prompts), 4)
    ngram = TextGenerationPipeline(engine)
    assert run_requests(ngram, contexts(prompts), 4) == reference
    assert 0 < ngram.speculative.stats["accepted"] < ngram.speculative.stats["drafted"]  # accepts and rejections
    drafted = TextGenerationPipeline(engine)
    drafted.speculative.drafter = DraftModelDrafter(draft_engine)  # what speculative="draft" builds
    assert run_requests(drafted, contexts(prompts), 3) == reference
    # one at a time, and with penalties (their counts include the drafts before each position)
    for i, prompt in enumerate(prompts[:2]):
        assert run_requests(ngram, contexts([prompt]), 2)["r0"] == reference[f"r{i}"]
    penalised = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, min_new_tokens=5)
    expected = run_requests(plain(engine), contexts(prompts, **penalised), 4)
    assert run_requests(ngram, contexts(prompts, **penalised), 4) == expected


@pytest.fixture(scope="module")
def sample_prompt(engine, run_requests):
    """PROMPT and its greedy continuation (a loop): n-gram drafts from it are often right."""
    greedy = run_requests(plain(engine), contexts([PROMPT], max_new=8), 4)["r0"]
    return np.concatenate([PROMPT, greedy]).astype(np.int32)


def _exact_first_two(params, prompt, temperature, top_k, presence):
    """p(t1, t2) of sampling (temperature, top_k, presence penalty) from the uncached full forward."""
    n, vocab = prompt.size, CFG.vocab_size
    tokens = np.concatenate([np.tile(prompt, (vocab, 1)), np.arange(vocab)[:, None]], axis=1).astype(np.int32)
    cache = llama.init_kv_cache(CFG, vocab, RUNTIME.max_seq_len)
    logits, _ = jax.jit(lambda p, t: llama.forward(p, CFG, t, jnp.broadcast_to(jnp.arange(n + 1), t.shape), cache,
                                                   jnp.arange(vocab), kv_len=RUNTIME.max_seq_len))(params, tokens)
    logits = np.asarray(logits, np.float64)

    def probs(row_logits):
        kth = np.sort(row_logits, axis=-1)[..., -top_k, None]
        z = np.where(row_logits >= kth, row_logits / temperature, -np.inf)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    first = probs(logits[0, n - 1])  # [V]
    second = logits[:, n] - presence * np.eye(vocab)  # [V, V]: t1 was generated once
    return first[:, None] * probs(second)


def _sampled_pairs(pipeline, prompt, num, **params):
    pairs = []
    for start in range(0, num, RUNTIME.max_batch_size):
        batch = {f"s{seed}": TextContext(f"s{seed}", prompt, max_length=RUNTIME.max_seq_len,
                                         sampling_params=SamplingParams(max_new_tokens=6, seed=seed, **params))
                 for seed in range(start, start + RUNTIME.max_batch_size)}
        out = pipeline.next_token(TextGenerationInputs(batch, 2))  # prefill samples t1, one verify round t2...
        pairs += [tuple(o.tokens[:2]) for o in out.values()]
        for rid in batch:
            pipeline.release(rid)
    return pairs


def _chi_square_p(pairs, joint):
    observed = np.zeros_like(joint)
    for t1, t2 in pairs:
        observed[t1, t2] += 1
    observed, expected = observed.ravel(), joint.ravel() * len(pairs)
    if observed[expected == 0].any():
        return 0.0  # a pair the target cannot produce (e.g. outside top-k)
    big = expected >= 5  # the rest pooled into one bin
    obs, exp = observed[big], expected[big]
    if expected[~big].sum() > 0:
        obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("drafter", ["ngram", "bad"])
def test_sampled_tokens_follow_the_target_distribution(engine, params, sample_prompt, drafter):
    """The first two sampled tokens (t1 from prefill, t2 from the first verify round: an accepted draft or a
    resampled token) over 2400 seeds against the exact joint p(t1) p(t2 | t1)."""
    pipeline = TextGenerationPipeline(engine)
    # every row drafts: n-grams from one token on, or random tokens
    pipeline.speculative.drafter = BadDrafter(seed=0) if drafter == "bad" else NgramDrafter(min_ngram=1)
    pairs = _sampled_pairs(pipeline, sample_prompt, 2400, temperature=0.8, top_k=6, presence_penalty=0.7)
    assert all(len(p) == 2 for p in pairs)
    spec = pipeline.speculative.stats
    assert spec["rounds"] == 2400 and 0 < spec["accepted"] < spec["drafted"]
    assert _chi_square_p(pairs, _exact_first_two(params, sample_prompt, 0.8, 6, 0.7)) > 1e-3
    # the test can fail: the same samples against another temperature or penalty are rejected
    assert _chi_square_p(pairs, _exact_first_two(params, sample_prompt, 1.0, 6, 0.7)) < 1e-4
    assert _chi_square_p(pairs, _exact_first_two(params, sample_prompt, 0.8, 6, 0.0)) < 1e-4


def test_stops_lengths_logprobs_exact_and_no_compiles_after_warmup(engine, sample_prompt, run_requests):
    before = compile_count()
    prompts = _prompts(3)
    eos = int(run_requests(plain(engine), contexts(prompts[:1], max_new=8), 4)["r0"][3])  # a token it generates
    mixes = [
        (dict(max_new=7), 4),
        (dict(max_new=11, top_k=4, temperature=0.7, seed=3), 3),
        (dict(max_new=9, stop_token_ids=[eos]), 4),
        (dict(max_new=12, min_new_tokens=6, stop_token_ids=[eos], top_k=0, seed=1), 2),
    ]
    for params, steps in mixes:
        expected = run_requests(plain(engine), contexts(prompts, **params), steps)
        got = run_requests(TextGenerationPipeline(engine), contexts(prompts, **params), steps)
        if "seed" not in params:  # sampled rows draw differently with speculation: lengths and stops still hold
            assert got == expected
        for tokens in got.values():
            assert params.get("min_new_tokens", 0) <= len(tokens) <= params["max_new"]
            if "stop_token_ids" in params:
                assert eos not in tokens  # the stop token ends the request and is not returned
            else:
                assert len(tokens) == params["max_new"]
    # a call returns at most num_steps x (K + 1) tokens per row, with the log-probabilities of each
    def lp_context():
        return TextContext("lp", sample_prompt, max_length=RUNTIME.max_seq_len, log_probabilities=2,
                           sampling_params=SamplingParams(max_new_tokens=14))

    out = TextGenerationPipeline(engine).next_token(TextGenerationInputs({"lp": lp_context()}, 2))["lp"]
    assert 3 <= len(out.tokens) <= 2 * (RUNTIME.num_speculative_tokens + 1)
    reference, ctx, ref_tokens, ref_lp = plain(engine), lp_context(), [], []
    while len(ref_tokens) < len(out.tokens):
        ref = reference.next_token(TextGenerationInputs({"lp": ctx}, 1))["lp"]
        ref_tokens, ref_lp = ref_tokens + ref.tokens, ref_lp + ref.log_probabilities
    assert ref_tokens == out.tokens and len(out.log_probabilities) == len(out.tokens)
    for a, b in zip(out.log_probabilities, ref_lp):
        np.testing.assert_allclose(a.token_log_probabilities, b.token_log_probabilities, atol=1e-5)
        np.testing.assert_allclose(list(a.top_log_probabilities[0].values()),
                                   list(b.top_log_probabilities[0].values()), atol=1e-5)
        assert a.top_log_probabilities[0].keys() == b.top_log_probabilities[0].keys()
    assert compile_count() == before
    assert engine.num_programs == len(RUNTIME.prefill_shapes()) + len(RUNTIME.decode_shapes()) + len(
        RUNTIME.verify_shapes())


def test_bad_configurations_name_the_field(engine):
    with pytest.raises(ValueError, match="speculative"):
        RuntimeConfig(speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        RuntimeConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative"):
        RuntimeConfig(speculative="ngram", data_parallel=2, max_batch_size=2)
    draft = Engine(llama, CFG, llama.init_params(CFG, jax.random.key(2)),
                   dataclasses.replace(RUNTIME, speculative="draft"))
    with pytest.raises(ValueError, match="draft_model"):
        TextGenerationPipeline(draft)
    with pytest.raises(ValueError, match="draft_model"):
        TextGenerationPipeline(engine, draft_engine=draft)  # ngram does not take a draft model


def test_load_and_cli_options_check_the_draft_model_first():
    from maxjax.cli import build_parser
    from maxjax.pipelines.registry import load_text_pipeline

    for fields in (dict(speculative="ngram", draft_model="small.gguf"), dict(speculative="draft"),
                   dict(draft_model="small.gguf")):
        with pytest.raises(ValueError, match="draft_model"):
            load_text_pipeline("no/such/model.gguf", **fields)  # refused before any weights are read
    args = build_parser().parse_args(["generate", "hi", "--speculative", "draft", "--num-speculative-tokens", "3",
                                      "--draft-model", "small.gguf"])
    assert (args.speculative, args.num_speculative_tokens, args.draft_model) == ("draft", 3, "small.gguf")


def test_draft_model_from_a_folder_must_share_the_vocabulary(tmp_path):
    transformers = require("transformers")
    from maxjax.pipelines.registry import load_draft_engine

    def save(name, vocab):
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / name)
        return tmp_path / name

    draft = load_draft_engine(save("same", CFG.vocab_size), CFG, dataclasses.replace(RUNTIME, speculative="draft"))
    assert draft.vocab_size == CFG.vocab_size and draft.config.speculative is None
    with pytest.raises(ValueError, match="draft_model: its vocabulary size 48"):
        load_draft_engine(save("other", 48), CFG, dataclasses.replace(RUNTIME, speculative="draft"))
