"""AudioGenerator end to end: random Orpheus Llama (speech tokens) + random SNAC 24 kHz, through `next_chunk`.

References: the speech tokens are checked against the text runtime run directly on the same prompts; the audio
against `maxjax.pipelines.orpheus.stream_window_audio` (the reference sliding-window decoder) over the same tokens.
"""

import dataclasses

import numpy as np
import pytest

from conftest import require

from maxjax.context import AudioContext
from maxjax.interfaces import (AudioGenerationRequest, GenerationStatus, PipelineTask, SamplingParams,
                               TextGenerationInputs)
from maxjax.pipelines import orpheus
from maxjax.pipelines.audio import AudioGeneratorPipeline, load_audio_pipeline, speak_to_file
from maxjax.pipelines.audio_tokenizer import AudioTokenizer
from maxjax.runtime.compile_cache import compile_count

NUM_STEPS = 7
RUNTIME = dict(max_batch_size=2, max_seq_len=256, length_buckets=(256,), num_steps=NUM_STEPS)
SPF = 2048  # samples per Orpheus frame at 24 kHz


@pytest.fixture(scope="module")
def tts():
    tokenizer, pipeline = load_audio_pipeline(None, **RUNTIME)
    pipeline.warmup()
    return tokenizer, pipeline


def _request(rid, text, voice="tara", max_new_tokens=120, **kw):
    return AudioGenerationRequest(request_id=rid, index=0, model=f"orpheus:{voice}" if voice else "orpheus",
                                  input=text, sampling_params=SamplingParams(max_new_tokens=max_new_tokens), **kw)


def _run_chunks(pipeline, contexts, max_calls=100):
    """next_chunk until every context is done; returns {rid: [AudioGeneratorOutput, ...]}, then releases."""
    outs = {rid: [] for rid in contexts}
    for _ in range(max_calls):
        live = {rid: c for rid, c in contexts.items() if not c.is_done}
        if not live:
            break
        for rid, out in pipeline.next_chunk(live).items():
            outs[rid].append(out)
    for ctx in contexts.values():
        pipeline.release(ctx)
    assert all(c.is_done for c in contexts.values())
    return outs


def _reference_tokens(tokenizer, pipeline, requests):
    """The text runtime alone on the same prompts: {rid: generated token ids} (stop token excluded)."""
    speech = pipeline.speech
    contexts = {r.request_id: tokenizer.build_context(dataclasses.replace(r, request_id="ref-" + r.request_id))
                for r in requests}
    batch = {c.request_id: c for c in contexts.values()}
    tokens = {rid: [] for rid in contexts}
    while any(not c.is_done for c in batch.values()):
        out = speech.next_token(TextGenerationInputs({k: c for k, c in batch.items() if not c.is_done}, NUM_STEPS))
        for rid, ctx in contexts.items():
            if ctx.request_id in out:
                tokens[rid] += out[ctx.request_id].tokens
    for c in batch.values():
        speech.release(c.request_id)
    return tokens, {rid: c.status for rid, c in contexts.items()}


def _reference_audio(pipeline, token_ids, prefix_frames=None):
    vocab = pipeline.vocab
    frames = orpheus.tokens_to_frames(vocab, token_ids)
    first = orpheus.STREAM_WINDOW_FRAMES - 1
    if prefix_frames is not None:
        frames = np.concatenate([prefix_frames, frames])
        first = max(first, len(prefix_frames))
    if len(frames) <= first:
        return np.zeros((0,), np.float32), 0
    chunks = [c for c in orpheus.stream_window_audio(pipeline.decoder, vocab, frames, first, len(frames))
              if c is not None]
    return (np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)), len(frames)


REQUESTS = [_request("a", "Hello there, how are you?"), _request("b", "Short.", voice=None, max_new_tokens=45)]


def test_a_request_naming_an_adapter_is_refused(tts):
    tokenizer, _ = tts
    with pytest.raises(ValueError, match="lora"):
        tokenizer.build_context(_request("adapter", "Hello.", lora="my-voice-adapter"))


def test_next_chunk_matches_text_runtime_and_reference_decoder(tts):
    tokenizer, pipeline = tts
    contexts = {r.request_id: tokenizer.build_context(r) for r in REQUESTS}
    outs = _run_chunks(pipeline, contexts)
    ref_tokens, ref_status = _reference_tokens(tokenizer, pipeline, REQUESTS)
    statuses = set()
    for rid, ctx in contexts.items():
        generated = [t for t in ctx.generated_tokens.tolist() if t not in pipeline.vocab.stop_token_ids]
        assert generated == ref_tokens[rid]
        assert ctx.status == ref_status[rid]
        statuses.add(ctx.status)
        chunks = outs[rid]
        assert [o.is_done for o in chunks] == [False] * (len(chunks) - 1) + [True]
        assert [o.metadata.chunk_id for o in chunks] == list(range(len(chunks)))
        assert all(o.metadata.final_chunk == o.is_done and o.metadata.sample_rate == 24000 for o in chunks)
        assert all(o.metadata.request_id == rid and o.audio_data.dtype == np.float32 for o in chunks)
        assert all(o.metadata.duration == pytest.approx(o.audio_data.size / 24000) for o in chunks)
        assert chunks[-1].metadata.tokens_generated == ctx.num_generated
        assert sum(o.audio_data.size > 0 for o in chunks) > 0, "the random model must produce real frames"

        audio = np.concatenate([o.audio_data for o in chunks])
        expected, num_frames = _reference_audio(pipeline, ref_tokens[rid])
        assert audio.size == expected.size == (num_frames - 3) * SPF  # every window valid: frames x hop
        np.testing.assert_allclose(audio, expected, atol=2e-5)
        assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 1e-3
        frames = orpheus.tokens_to_frames(pipeline.vocab, ref_tokens[rid])
        buffer = chunks[-1].buffer_speech_tokens
        assert buffer.size == 7 * min(4, len(frames))
        np.testing.assert_array_equal(orpheus.tokens_to_frames(pipeline.vocab, buffer), frames[-4:])
    assert statuses == {GenerationStatus.END_OF_SEQUENCE, GenerationStatus.MAXIMUM_LENGTH}, statuses


def test_non_streaming_returns_one_clip_equal_to_the_stream(tts):
    tokenizer, pipeline = tts
    streamed = _run_chunks(pipeline, {"s": tokenizer.build_context(dataclasses.replace(REQUESTS[0], request_id="s"))})
    whole = _run_chunks(pipeline, {"w": tokenizer.build_context(
        dataclasses.replace(REQUESTS[0], request_id="w", streaming=False))})["w"]
    assert all(o.audio_data.size == 0 for o in whole[:-1]) and whole[-1].is_done
    np.testing.assert_allclose(whole[-1].audio_data, np.concatenate([o.audio_data for o in streamed["s"]]), atol=2e-5)
    assert whole[-1].metadata.duration == pytest.approx(whole[-1].audio_data.size / 24000)


def test_buffer_speech_tokens_continue_seamlessly(tts):
    tokenizer, pipeline = tts
    first = _run_chunks(pipeline, {"p": tokenizer.build_context(dataclasses.replace(REQUESTS[0], request_id="p"))})
    buffer = first["p"][-1].buffer_speech_tokens
    garbage = np.array([5, 128257, 999], np.int64)  # a text token and a marker: skipped like any invalid token
    follow = dataclasses.replace(REQUESTS[1], request_id="f", buffer_speech_tokens=np.concatenate([garbage, buffer]))
    ctx = tokenizer.build_context(follow)
    outs = _run_chunks(pipeline, {"f": ctx})["f"]
    tokens, _ = _reference_tokens(tokenizer, pipeline, [REQUESTS[1]])
    expected, _ = _reference_audio(pipeline, tokens["b"], prefix_frames=orpheus.tokens_to_frames(pipeline.vocab, buffer))
    audio = np.concatenate([o.audio_data for o in outs])
    assert audio.size == expected.size > 0
    np.testing.assert_allclose(audio, expected, atol=2e-5)


class _NoSlots:
    def slot_of(self, request_id):
        return None


class _ScriptedSpeech:
    """A speech stage that emits fixed tokens (invalid ones included), to drive next_chunk's parsing."""

    def __init__(self, script, config):
        self.script, self.config, self.slots = list(script), config, _NoSlots()

    def next_token(self, inputs):
        for ctx in inputs.batch.values():
            for _ in range(inputs.num_steps):
                if self.script and not ctx.is_done:
                    ctx.update(self.script.pop(0))
        return {rid: ctx.to_generation_output() for rid, ctx in inputs.batch.items()}


def test_invalid_tokens_follow_the_reference_and_never_crash(tts):
    tokenizer, pipeline = tts
    vocab = pipeline.vocab
    rng = np.random.default_rng(3)
    good = [vocab.audio_token_offset + (i % 7) * 4096 + int(rng.integers(0, 4096)) for i in range(7 * 9)]
    script = list(good)
    script[10] = 42  # a text token: skipped
    script[20] = vocab.start_of_human  # a marker: skipped
    script[30] = vocab.audio_token_offset + 7 * 4096 + 5  # an out-of-range code: its windows emit nothing
    script.append(vocab.end_of_speech)
    fake = AudioGeneratorPipeline(_ScriptedSpeech(script, pipeline.speech.config), pipeline.decoder, vocab,
                                  num_steps=NUM_STEPS)
    ctx = tokenizer.build_context(_request("x", "Invalid tokens.", max_new_tokens=200))
    outs = _run_chunks(fake, {"x": ctx})["x"]
    assert ctx.status == GenerationStatus.END_OF_SEQUENCE
    expected, _ = _reference_audio(pipeline, script)
    audio = np.concatenate([o.audio_data for o in outs])
    frames = orpheus.tokens_to_frames(vocab, script)
    assert not orpheus.frames_valid(vocab, frames).all()  # some windows were skipped ...
    assert 0 < audio.size == expected.size < (len(frames) - 3) * SPF  # ... exactly as the reference skips them
    np.testing.assert_allclose(audio, expected, atol=2e-5)


def test_zero_compiles_after_warmup_for_a_mixed_batch(tts):
    tokenizer, pipeline = tts
    before = compile_count()
    a = tokenizer.build_context(_request("m1", "Mixed batch, streaming.", max_new_tokens=40))
    b = tokenizer.build_context(_request("m2", "A second request that is not streamed at all.", voice="leo",
                                         max_new_tokens=60, streaming=False))
    c = tokenizer.build_context(_request("m3", "Joins later.", max_new_tokens=30))
    pipeline.next_chunk({"m1": a})
    outs = _run_chunks(pipeline, {"m1": a, "m2": b})
    outs3 = _run_chunks(pipeline, {"m3": c})
    assert compile_count() == before
    assert outs["m2"][-1].audio_data.size > 0 and outs3["m3"][-1].is_done


def test_bad_requests_raise_clear_errors_and_leave_others_alone(tts):
    tokenizer, pipeline = tts
    good = tokenizer.build_context(dataclasses.replace(REQUESTS[1], request_id="g"))
    pipeline.next_chunk({"g": good})
    with pytest.raises(ValueError, match="input"):
        _request("x1", "x" * 4097)
    too_long = _request("x2", "ok")
    object.__setattr__(too_long, "input", "y" * 4097)  # bypass the request's own check: the tokenizer checks too
    with pytest.raises(ValueError, match="input"):
        tokenizer.build_context(too_long)
    for text in ("", "   "):
        with pytest.raises(ValueError, match="input"):
            tokenizer.build_context(_request("x3", text))
    for voice in ("ta ra", "9lives", "tara!", "a/b"):
        with pytest.raises(ValueError, match="model"):
            tokenizer.build_context(_request("x4", "Hello", voice=voice))
    with pytest.raises(ValueError, match="audio_prompt"):
        tokenizer.build_context(_request("x5", "Hello", audio_prompt_tokens=[1, 2, 3], audio_prompt_transcription="hi"))
    with pytest.raises(ValueError, match="audio_prompt"):
        tokenizer.build_context(_request("x6", "Hello", audio_prompt_transcription="only text"))
    with pytest.raises(ValueError, match="prompt"):
        tokenizer.build_context(_request("x7", "Hello", prompt=[1, 10**7]))
    rest = _run_chunks(pipeline, {"g": good})["g"]
    tokens, status = _reference_tokens(tokenizer, pipeline, [REQUESTS[1]])
    assert [t for t in good.generated_tokens.tolist() if t != pipeline.vocab.end_of_speech] == tokens["b"]
    assert good.status == status["b"] and rest[-1].is_done


def test_prompt_layout_voice_cloning_and_raw_prompt(tts):
    tokenizer, _ = tts
    vocab = tokenizer.vocab
    text_ids = lambda s: tokenizer.tokenizer.encode_text(s, add_special_tokens=True).tolist()  # noqa: E731
    ctx = tokenizer.build_context(_request("p1", "Hi.", voice="tara"))
    assert isinstance(ctx, AudioContext)
    assert ctx.prompt_tokens.tolist() == [vocab.start_of_human, *text_ids("tara: Hi."), 128009, 128260, 128261, 128257]
    assert text_ids("tara: Hi.")[0] == 128000  # Llama-3 BOS inside the human turn, as the reference
    assert ctx.eos_token_ids == {vocab.end_of_speech} and tokenizer.eos == 128258
    no_voice = tokenizer.build_context(_request("p2", "Hi.", voice=None))
    assert no_voice.prompt_tokens.tolist()[1:-4] == text_ids("Hi.")
    speech = [vocab.audio_token_offset + 3, vocab.audio_token_offset + 4096 + 7]
    clone = tokenizer.build_context(_request("p3", "Hi.", audio_prompt_tokens=speech, audio_prompt_transcription="Yo."))
    expected_prefix = (orpheus.build_prompt(vocab, text_ids("Yo.")) + speech
                       + [vocab.end_of_speech, vocab.custom_token_base + 6])
    assert clone.prompt_tokens.tolist() == expected_prefix + ctx.prompt_tokens.tolist()
    raw = tokenizer.build_context(_request("p4", None, prompt=[1, 2, 3]))
    assert raw.prompt_tokens.tolist() == [1, 2, 3]
    assert raw.max_length == 3 + 120


def test_speak_to_file_writes_a_24khz_wav(tts, tmp_path):
    soundfile = require("soundfile")
    tokenizer, pipeline = tts
    path = tmp_path / "out.wav"
    info = speak_to_file("Hello there, how are you?", path, voice="tara", sampling_params=SamplingParams(
        max_new_tokens=120), **{**RUNTIME, "max_batch_size": 2})
    data, rate = soundfile.read(str(path), dtype="float32")
    assert rate == info["sample_rate"] == 24000 and info["random_weights"]
    assert soundfile.info(str(path)).subtype == "PCM_16"
    # Same seed, same prompt: the clip the module's pipeline streamed, quantised to 16 bits.
    streamed = _run_chunks(pipeline, {"q": tokenizer.build_context(dataclasses.replace(REQUESTS[0], request_id="q"))})
    expected = np.concatenate([o.audio_data for o in streamed["q"]])
    assert data.size == info["samples"] == expected.size > 0
    np.testing.assert_allclose(data, expected, atol=2 / 32767)


def test_speech_token_task_returns_the_token_stage(tts):
    tokenizer, speech = load_audio_pipeline(None, task=PipelineTask.SPEECH_TOKEN_GENERATION, **RUNTIME)
    assert isinstance(tokenizer, AudioTokenizer) and not hasattr(speech, "next_chunk")
    assert hasattr(speech, "next_token") and speech.tokenizer is tokenizer
    with pytest.raises(ValueError, match="bogus"):
        load_audio_pipeline(None, bogus=1)
    import maxjax

    tokenizer, audio = maxjax.load_pipeline(None, task=PipelineTask.AUDIO_GENERATION, **RUNTIME)
    assert isinstance(audio, AudioGeneratorPipeline) and audio.decoder_sample_rate == 24000
    assert maxjax.TTS.__module__ == "maxjax.pipelines.audio"


@pytest.mark.slow
def test_checkpoint_folder_loads_like_the_random_models(tts, tmp_path):
    from maxjax.pipelines.orpheus_random import save_random_orpheus

    tokenizer, pipeline = tts
    folder = save_random_orpheus(tmp_path / "orpheus")
    tok2, pipe2 = load_audio_pipeline(folder, **RUNTIME)
    assert tok2.vocab == tokenizer.vocab
    ctx = tok2.build_context(dataclasses.replace(REQUESTS[0], request_id="c"))
    outs = _run_chunks(pipe2, {"c": ctx})["c"]
    ref = _run_chunks(pipeline, {"c": tokenizer.build_context(dataclasses.replace(REQUESTS[0], request_id="c"))})["c"]
    np.testing.assert_allclose(np.concatenate([o.audio_data for o in outs]),
                               np.concatenate([o.audio_data for o in ref]), atol=1e-4)


@pytest.mark.slow
def test_random_snac_state_has_the_reference_layout():
    torch = require("torch")  # noqa: F841
    snac = require("snac")
    from maxjax.architectures.snac import SnacConfig
    from maxjax.pipelines.orpheus_random import snac_config_dict, snac_state_shapes

    cfg = SnacConfig()
    model = snac.SNAC(**{k: v for k, v in snac_config_dict(cfg).items() if k != "latent_dim"})
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if k.startswith("decoder.") or ".codebook." in k or ".out_proj." in k}
    assert snac_state_shapes(cfg) == ref
