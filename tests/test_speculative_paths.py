"""Speculative decoding through `load_pipeline` / `LLM` with a draft model, and the adaptive pause of drafting.

The draft model runs through the public loaders on tiny random models that share SmolLM2's vocabulary
(tests/tiny_models.py): greedy text must be the plain decode's. The pause is checked on a tiny engine with
scripted drafters that are always wrong, always right, or find nothing: which generated positions a row
drafts at shows whether it stopped drafting for ``PAUSE_TOKENS`` tokens after its acceptance average fell
below ``MIN_ACCEPTED``, and whether a drafter that found nothing is asked again after ``NO_DRAFT_STEPS``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tiny_models
from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationRequest
from maxjax.pipelines import speculative
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

RUNTIME = dict(max_batch_size=1, max_seq_len=128, num_speculative_tokens=3)  # as tests/test_cli_paths.py's
PROMPTS = ["What is the capital of France?", "Repeat after me: one two three, one two three, one two three"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2_gguf):
    folder = tmp_path_factory.mktemp("spec")
    return (tiny_models.hf_folder(folder / "tiny", smollm2_gguf),
            tiny_models.q8_gguf(folder / "tiny-q8.gguf", smollm2_gguf, seed=3))


def test_draft_model_through_load_pipeline_and_llm_is_greedy_identical(sources, run_requests):
    import maxjax
    from maxjax.pipelines.llm import LLM

    target, other = sources
    plain = LLM(str(target), max_batch_size=1, max_seq_len=128, progress=False)
    params = SamplingParams(max_new_tokens=24)
    expected = plain.generate(PROMPTS, params)

    # the protocol: the target drafting for itself accepts every draft
    tokenizer, pipeline = maxjax.load_pipeline(str(target), speculative="draft", draft_model=str(target), **RUNTIME)
    reference = {}
    for i, prompt in enumerate(PROMPTS):
        request = plain.request(prompt, params)
        rid = request.request_id
        reference[i] = run_requests(plain.pipeline, {rid: plain.tokenizer.build_context(request)})[rid]
        ctx = tokenizer.build_context(TextGenerationRequest("r", 0, "tiny", messages=request.messages,
                                                            sampling_params=params))
        assert run_requests(pipeline, {"r": ctx})["r"] == reference[i]
    stats = pipeline.speculative.stats
    assert stats["rounds"] > 0 and stats["accepted"] == stats["drafted"] > 0

    # LLM with another model as the drafter: rejections, the same text
    drafted = LLM(str(target), speculative="draft", draft_model=str(other), progress=False, **RUNTIME)
    assert drafted.generate(PROMPTS, params) == expected
    stats = drafted.pipeline.speculative.stats
    assert stats["drafted"] > stats["accepted"]


# ---- the adaptive pause, on a tiny engine -------------------------------------------------------------------

CFG = llama.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
ENGINE_RUNTIME = RuntimeConfig(max_batch_size=1, max_seq_len=160, max_num_steps=8, length_buckets=(160,),
                               batch_buckets=(1,), prefill_batch_buckets=(1,), max_prefill_len=160,
                               speculative="ngram", num_speculative_tokens=3)
PROMPT = np.array([5, 9, 2, 17, 30, 11, 4, 6], np.int32)
NEW = 150


class Scripted:
    """A drafter that knows the greedy continuation: ``right`` drafts it, ``wrong`` drafts a token off by one
    (the first draft is always rejected), ``none`` finds nothing. Records the generated count at each ask."""

    def __init__(self, continuation: list[int], mode: str):
        self.continuation, self.mode, self.asked = continuation, mode, []

    def propose(self, work):
        out = []
        for ctx, k in work:
            g = ctx.num_generated
            self.asked.append(g)
            truth = np.array(self.continuation[g:g + k], np.int32)
            out.append({"right": truth, "wrong": (truth + 1) % CFG.vocab_size,
                        "none": np.zeros(0, np.int32)}[self.mode])
        return out

    def release(self, request_id):
        pass


@pytest.fixture(scope="module")
def engine():
    params = llama.init_params(CFG, jax.random.key(1))
    return Engine(llama, CFG, dict(params, lm_head=params["lm_head"] * 10), ENGINE_RUNTIME)


def _context():
    return TextContext("r", PROMPT, max_length=ENGINE_RUNTIME.max_seq_len,
                       sampling_params=SamplingParams(max_new_tokens=NEW, ignore_eos=True))


@pytest.fixture(scope="module")
def continuation(engine, run_requests):
    pipeline = TextGenerationPipeline(engine)
    pipeline.speculative = None
    return run_requests(pipeline, {"r": _context()})["r"]


def _run(engine, continuation, mode, run_requests):
    pipeline = TextGenerationPipeline(engine)
    drafter = pipeline.speculative.drafter = Scripted(continuation, mode)
    assert run_requests(pipeline, {"r": _context()}, ENGINE_RUNTIME.max_num_steps)["r"] == continuation
    return drafter.asked, pipeline.speculative.stats


def test_a_row_whose_drafts_fail_pauses_then_resumes(engine, continuation, run_requests):
    steps, pause = ENGINE_RUNTIME.max_num_steps, speculative.PAUSE_TOKENS
    asked, stats = _run(engine, continuation, "wrong", run_requests)
    # Three rejected rounds take the average from START_ACCEPTED (2.0) below MIN_ACCEPTED (0.7): 1.4, 0.98, 0.69.
    first = asked[0]
    assert asked[:3] == [first, first + 1, first + 2]  # each rejected round still gives one token
    resumed = asked[3]
    assert first + 3 + pause <= resumed < first + 3 + pause + steps  # resumes at the next round after the pause
    assert asked[3:6] == [resumed, resumed + 1, resumed + 2] and len(asked) <= 9
    assert stats["accepted"] == 0 and stats["rounds"] == len(asked)

    asked, stats = _run(engine, continuation, "right", run_requests)
    assert stats["accepted"] == stats["drafted"] > 0
    assert len(asked) == stats["rounds"] and all(b - a == 4 for a, b in zip(asked[:5], asked[1:6]))  # never pauses


def test_a_row_whose_drafter_finds_nothing_decodes_a_few_plain_steps(engine, continuation, run_requests):
    asked, stats = _run(engine, continuation, "none", run_requests)
    assert stats["rounds"] == 0  # nothing was ever verified
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert max(gaps) == speculative.NO_DRAFT_STEPS and min(gaps) >= 1  # a few plain steps, then asked again
    assert len(asked) >= NEW // speculative.NO_DRAFT_STEPS - 2  # asked again every few tokens, not paused
