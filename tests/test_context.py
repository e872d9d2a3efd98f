"""TextContext: the MAX token-array layout, chunked prefill, status rules, masks and cache slots."""

import subprocess
import sys

import numpy as np
import pytest

from maxjax.context import CHUNK_SIZE, AudioContext, TextContext
from maxjax.interfaces import GenerationStatus, InputContext, LogProbabilities, SamplingParams

EOS = 2


def make(n_prompt=5, max_length=64, **kwargs):
    kwargs.setdefault("eos_token_ids", {EOS})
    prompt = np.arange(10, 10 + n_prompt, dtype=np.int64)
    return TextContext("req", prompt, max_length=max_length, **kwargs)


def indices(ctx):
    return ctx.start_idx, ctx.active_idx, ctx.end_idx


def test_conforms_to_input_context_protocol():
    assert isinstance(make(), InputContext)  # cache_seq_id raises while unassigned; the check must not
    assert isinstance(AudioContext("a", [1, 2], max_length=8), InputContext)


def test_initial_layout():
    ctx = make(5)
    assert indices(ctx) == (0, 5, 5) and ctx.committed_idx == 0
    assert ctx.tokens.shape == (CHUNK_SIZE,) and ctx.tokens.dtype == np.int32
    np.testing.assert_array_equal(ctx.next_tokens, np.arange(10, 15))
    np.testing.assert_array_equal(ctx.all_tokens, ctx.prompt_tokens)
    assert ctx.generated_tokens.size == 0 and ctx.num_generated == 0
    assert ctx.active_length == 5 and ctx.current_length == 5
    assert ctx.is_ce and ctx.is_initial_prompt and not ctx.is_done


def test_chunked_prefill_walk_through():
    """A 100-token prompt processed in chunks of 32, as a runtime with a 32-token prefill bucket does."""
    prompt = np.arange(1000, 1100)
    ctx = TextContext("r", prompt, max_length=200, eos_token_ids={EOS})
    ctx.set_token_indices(active_idx=32)  # first chunk
    seen = []
    while True:
        assert ctx.is_ce and ctx.active_length <= 32
        seen.append(ctx.next_tokens.copy())
        if ctx.active_idx == ctx.end_idx:
            break
        chunk, following = ctx.active_length, min(32, ctx.end_idx - ctx.active_idx)
        ctx.bump_token_indices(start_idx=chunk, active_idx=following)
    assert [len(c) for c in seen] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate(seen), prompt)
    assert ctx.compute_num_available_steps(200) == 200 - 96
    ctx.update(7)  # first generated token, sampled from the last chunk
    assert indices(ctx) == (100, 101, 101) and not ctx.is_ce and not ctx.is_initial_prompt
    np.testing.assert_array_equal(ctx.next_tokens, [7])
    np.testing.assert_array_equal(ctx.generated_tokens, [7])
    assert ctx.outstanding_completion_tokens() == [(7, None)]


def test_update_mid_prompt_moves_window_like_max():
    ctx = make(10)
    ctx.set_token_indices(active_idx=4)
    ctx.update(99)  # sample of a non-final chunk: discarded
    assert indices(ctx) == (4, 10, 10)
    assert ctx.outstanding_completion_tokens() == [] and ctx.num_generated == 0


def test_set_token_indices_rejects_bad_layout():
    ctx = make(10)
    with pytest.raises(ValueError, match="start_idx"):
        ctx.set_token_indices(start_idx=5, active_idx=5)
    with pytest.raises(ValueError, match="active_idx"):
        ctx.set_token_indices(active_idx=11)
    with pytest.raises(ValueError, match="end_idx"):
        ctx.set_token_indices(end_idx=CHUNK_SIZE + 1, active_idx=CHUNK_SIZE + 1)
    with pytest.raises(ValueError, match="committed_idx"):
        ctx.bump_token_indices(committed_idx=-1)
    assert indices(ctx) == (0, 10, 10)


def test_token_array_grows_in_chunks():
    ctx = TextContext("r", np.arange(1, 31), max_length=1000, chunk_size=16)
    assert ctx.tokens.size == 32
    generated = list(range(100, 140))
    for t in generated:
        ctx.update(t)
        assert ctx.tokens.size % 16 == 0 and ctx.tokens.size >= ctx.end_idx
        np.testing.assert_array_equal(ctx.next_tokens, [t])
    assert ctx.tokens.size == 80 and ctx.end_idx == 70
    np.testing.assert_array_equal(ctx.all_tokens, np.r_[np.arange(1, 31), generated])
    np.testing.assert_array_equal(ctx.generated_tokens, generated)
    assert [t for t, _ in ctx.outstanding_completion_tokens()] == generated
    assert ctx.outstanding_completion_tokens() == []  # each token returned once


def test_eos_stops_and_is_not_returned():
    ctx = make(3)
    ctx.update(50)
    ctx.update(EOS)
    assert ctx.status is GenerationStatus.END_OF_SEQUENCE and ctx.is_done
    ctx.update(51)  # the tail of a multi-step decode after eos: dropped
    assert ctx.outstanding_completion_tokens() == [(50, None)]
    np.testing.assert_array_equal(ctx.generated_tokens, [50, EOS])


def test_ignore_eos_and_stop_token_ids():
    ctx = make(3, sampling_params=SamplingParams(ignore_eos=True, stop_token_ids=[77]))
    ctx.update(EOS)
    assert not ctx.is_done
    ctx.update(77)
    assert ctx.status is GenerationStatus.END_OF_SEQUENCE
    assert [t for t, _ in ctx.outstanding_completion_tokens()] == [EOS]


def test_max_length_and_max_new_tokens():
    ctx = make(5, max_length=7)
    ctx.update(40)
    assert not ctx.is_done
    ctx.update(41)  # reaches max_length: this last token is still returned
    assert ctx.status is GenerationStatus.MAXIMUM_LENGTH
    assert [t for t, _ in ctx.outstanding_completion_tokens()] == [40, 41]
    ctx = make(5, sampling_params=SamplingParams(max_new_tokens=3))
    for t in (40, 41, 42):
        ctx.update(t)
    assert ctx.status is GenerationStatus.MAXIMUM_LENGTH and ctx.num_generated == 3


def test_log_probabilities_travel_with_tokens():
    ctx = make(3, log_probabilities=2)
    lp = LogProbabilities([-0.1], [{50: -0.1, 51: -2.3}])
    ctx.update(50, lp)
    ctx.update(51)
    out = ctx.to_generation_output()
    assert out.tokens == [50, 51] and out.log_probabilities == [lp]
    assert out.final_status is GenerationStatus.ACTIVE


def test_rollback_and_jump_ahead_round_trip():
    ctx = make(4)
    for t in (20, 21, 22):
        ctx.update(t)
    before = (indices(ctx), ctx.all_tokens.copy())
    ctx.jump_ahead(30)
    ctx.jump_ahead(31)
    assert indices(ctx) == (6, 9, 9)  # window grows to include the forced tokens
    np.testing.assert_array_equal(ctx.next_tokens, [22, 30, 31])
    ctx.rollback(2)
    assert (indices(ctx), list(ctx.all_tokens)) == (before[0], list(before[1]))
    ctx.update(EOS)
    assert ctx.is_done
    ctx.rollback(1)  # un-doing the eos reopens the request
    assert not ctx.is_done and indices(ctx) == before[0]
    assert [t for t, _ in ctx.outstanding_completion_tokens()] == [20, 21, 22]
    with pytest.raises(ValueError, match="roll back"):
        ctx.rollback(4)  # would eat into the prompt


def test_reset_after_eviction():
    ctx = make(4, sampling_params=SamplingParams(max_new_tokens=4, min_new_tokens=3))
    ctx.update(20)
    ctx.update(21)
    ctx.assign_to_cache(3)
    ctx.reset()
    assert indices(ctx) == (0, 6, 6) and ctx.is_ce and ctx.is_initial_prompt
    np.testing.assert_array_equal(ctx.prompt_tokens, [10, 11, 12, 13, 20, 21])
    assert ctx.generated_tokens.size == 0
    assert ctx.num_generated == 2  # min/max new tokens keep counting from the original prompt
    assert ctx.cache_seq_id == 3  # the runtime frees the slot itself
    assert [m.shape[0] for m in ctx.get_min_token_logit_mask(2)] == [1, 0]
    ctx.update(22)
    assert not ctx.is_done
    ctx.update(23)
    assert ctx.status is GenerationStatus.MAXIMUM_LENGTH
    assert [t for t, _ in ctx.outstanding_completion_tokens()] == [20, 21, 22, 23]


def test_min_token_mask():
    ctx = make(4, eos_token_ids={EOS, 3}, sampling_params=SamplingParams(min_new_tokens=2, stop_token_ids=[9]))
    masks = ctx.get_min_token_logit_mask(4)
    assert len(masks) == 4 and all(m.dtype == np.int32 and m.ndim == 2 and m.shape[1] == 2 for m in masks)
    np.testing.assert_array_equal(masks[0], [[0, 2], [0, 3], [0, 9]])
    np.testing.assert_array_equal(masks[1], masks[0])
    assert masks[2].shape == (0, 2) and masks[3].shape == (0, 2)
    ctx.update(40)
    assert [m.shape[0] for m in ctx.get_min_token_logit_mask(3)] == [3, 0, 0]
    ctx.update(41)
    assert all(m.shape == (0, 2) for m in ctx.get_min_token_logit_mask(3))
    assert all(m.shape == (0, 2) for m in make(4).get_min_token_logit_mask(3))


def test_num_available_steps_at_length_limit():
    ctx = make(10, max_length=100)
    assert ctx.compute_num_available_steps(16) == 16  # nothing cached yet
    ctx.set_token_indices(active_idx=6)
    assert ctx.compute_num_available_steps(16) == 16 - 4
    ctx = TextContext("r", np.arange(1, 16), max_length=100)
    ctx.update(1)  # 15 cached, 1 active
    assert ctx.compute_num_available_steps(16) == 1
    ctx.update(1)
    assert ctx.compute_num_available_steps(16) == 0


def test_cache_slot_errors():
    ctx = make()
    assert not ctx.is_assigned_to_cache
    with pytest.raises(ValueError, match="cache slot"):
        _ = ctx.cache_seq_id
    with pytest.raises(ValueError, match="cache slot"):
        ctx.unassign_from_cache()
    with pytest.raises(ValueError, match="cache_seq_id"):
        ctx.assign_to_cache(-1)
    ctx.assign_to_cache(5)
    assert ctx.is_assigned_to_cache and ctx.cache_seq_id == 5
    with pytest.raises(ValueError, match="already"):
        ctx.assign_to_cache(6)
    ctx.unassign_from_cache()
    assert not ctx.is_assigned_to_cache


@pytest.mark.parametrize("kwargs,field", [
    ({"tokens": np.zeros((2, 2), np.int32)}, "tokens"), ({"tokens": []}, "tokens"), ({"tokens": [1, -1]}, "tokens"),
    ({"tokens": [0.5, 1.0]}, "tokens"), ({"max_length": 3}, "max_length"), ({"max_length": 2.5}, "max_length"),
    ({"log_probabilities": -1}, "log_probabilities"), ({"chunk_size": 0}, "chunk_size"),
    ({"sampling_params": {"top_k": 3}}, "sampling_params"),
])
def test_constructor_rejects(kwargs, field):
    args = {"tokens": [1, 2, 3], "max_length": 16} | kwargs
    with pytest.raises(ValueError, match=field):
        TextContext("r", args.pop("tokens"), **args)


def test_status_and_matcher():
    class Matcher:
        def __init__(self):
            self.seen, self.rolled = [], 0

        def consume_token(self, t):
            self.seen.append(t)
            return t != 666

        def rollback(self, n):
            self.rolled += n

    ctx = make(3)
    matcher = Matcher()
    ctx.set_matcher(matcher)
    ctx.update(5)
    ctx.jump_ahead(6)
    ctx.rollback(1)
    assert ctx.matcher is matcher and matcher.seen == [5, 6] and matcher.rolled == 1
    with pytest.raises(RuntimeError, match="666"):
        ctx.update(666)
    ctx.update_status(GenerationStatus.END_OF_SEQUENCE)  # e.g. a stop string matched in the pipeline
    assert ctx.is_done
    with pytest.raises(ValueError, match="status"):
        ctx.update_status("done")


def test_audio_context_fields():
    ctx = AudioContext("a", [1, 2, 3], max_length=32, audio_prompt_tokens=[7, 8], audio_prompt_transcription="hi",
                       streaming=False, eos_token_ids={128258})
    np.testing.assert_array_equal(ctx.audio_prompt_tokens, [7, 8])
    assert ctx.audio_prompt_transcription == "hi" and ctx.streaming is False
    assert ctx.buffer_speech_tokens is None and ctx.audio_buffer is None and ctx.decoded_index == 0
    ctx.update(128258)
    assert ctx.status is GenerationStatus.END_OF_SEQUENCE


def test_context_imports_no_jax():
    code = "import sys, maxjax.context; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
