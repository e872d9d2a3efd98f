"""Orpheus token conventions: vocab, prompt layout, audio tokens -> SNAC frames, streaming windows (numpy only)."""

import numpy as np
import pytest

from maxjax.pipelines import orpheus
from maxjax.pipelines.orpheus import OrpheusVocab

VOCAB = OrpheusVocab.default()


def _audio_ids(frames, vocab=VOCAB):
    """Token ids that encode frames [n, 7] the way Orpheus generates them."""
    frames = np.asarray(frames)
    return (vocab.audio_token_offset + frames + np.arange(7) * vocab.codebook_size).reshape(-1).tolist()


def _fake_vocab_table(base=128256):
    table = {f"<custom_token_{n}>": base + n for n in range(10 + 7 * 4096)}
    table["<|eot_id|>"] = 128009
    return table


def test_default_vocab_matches_reference_ids():
    v = VOCAB
    assert (v.start_of_human, v.end_of_text, v.end_of_human, v.start_of_ai, v.start_of_speech, v.end_of_speech) == (
        128259, 128009, 128260, 128261, 128257, 128258)
    assert (v.audio_token_offset, v.custom_token_base, v.codebook_size) == (128266, 128256, 4096)
    assert v.stop_token_ids == (128258,)


def test_vocab_from_tokenizer_like_objects():
    table = _fake_vocab_table()
    assert OrpheusVocab.from_tokenizer(table) == VOCAB

    class HFLike:
        unk_token_id = 0

        def get_vocab(self):
            return table

    class TokenizersLike:
        def token_to_id(self, token):
            return table.get(token)

    assert OrpheusVocab.from_tokenizer(HFLike()) == VOCAB
    assert OrpheusVocab.from_tokenizer(TokenizersLike()) == VOCAB
    shifted = OrpheusVocab.from_tokenizer({k: v + 100 if "custom" in k else v for k, v in table.items()})
    assert shifted.audio_token_offset == 128366 and shifted.start_of_human == 128359
    with pytest.raises(ValueError, match="eot_id"):
        OrpheusVocab.from_tokenizer({k: v for k, v in table.items() if k != "<|eot_id|>"})
    broken = dict(table)
    broken["<custom_token_28681>"] += 5
    with pytest.raises(ValueError, match="consecutive"):
        OrpheusVocab.from_tokenizer(broken)


def test_build_prompt_layout():
    assert orpheus.prompt_text("Hello there.", "tara") == "tara: Hello there."
    assert orpheus.prompt_text("Hello there.") == "Hello there."
    text_ids = [128000, 83, 5169, 25, 22691, 1070, 13]  # <|begin_of_text|> "tara: Hello there."
    prompt = orpheus.build_prompt(VOCAB, np.array(text_ids))
    assert prompt == [128259, *text_ids, 128009, 128260, 128261, 128257]
    assert all(type(t) is int for t in prompt)


def _reference_convert(window):
    """The reference convert_to_audio's code layout for a flat list of 7 * n codes."""
    n = len(window) // 7
    c0 = [window[7 * j] for j in range(n)]
    c1 = [window[7 * j + k] for j in range(n) for k in (1, 4)]
    c2 = [window[7 * j + k] for j in range(n) for k in (2, 3, 5, 6)]
    return c0, c1, c2


def test_tokens_to_frames_and_level_mapping():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, (5, 7))
    ids = _audio_ids(frames)
    np.testing.assert_array_equal(orpheus.tokens_to_frames(VOCAB, ids), frames)
    np.testing.assert_array_equal(orpheus.tokens_to_frames(VOCAB, ids[:-3]), frames[:4])  # partial frame left out
    codes = orpheus.frames_to_codes(frames)
    for got, expected in zip(codes, _reference_convert(frames.reshape(-1).tolist())):
        np.testing.assert_array_equal(got, expected)
    assert [c.shape for c in codes] == [(5,), (10,), (20,)]
    batched = orpheus.frames_to_codes(np.stack([frames[:4], frames[1:]]))  # [2, 4, 7] -> [2, 4], [2, 8], [2, 16]
    assert [c.shape for c in batched] == [(2, 4), (2, 8), (2, 16)]
    np.testing.assert_array_equal(batched[2][1], _reference_convert(frames[1:].reshape(-1).tolist())[2])
    with pytest.raises(ValueError, match="frames"):
        orpheus.frames_to_codes(np.zeros((3, 6), np.int32))


def test_invalid_tokens_are_skipped_or_flagged_never_raised():
    frames = np.arange(1, 15).reshape(2, 7) * 100
    ids = _audio_ids(frames)
    noisy = [ids[0], 1734, ids[1], VOCAB.end_of_speech, VOCAB.start_of_speech, *ids[2:], 128009, 5]
    np.testing.assert_array_equal(orpheus.tokens_to_frames(VOCAB, noisy), frames)  # text and markers skipped

    # A token meant for the next position lands out of range but still advances the position.
    bad = list(ids)
    bad[3] = ids[4]
    parsed = orpheus.tokens_to_frames(VOCAB, bad)
    assert parsed[0, 3] == frames[0, 4] + 4096
    np.testing.assert_array_equal(orpheus.frames_valid(VOCAB, parsed), [False, True])
    np.testing.assert_array_equal(parsed[1], frames[1])

    # Code 0 is valid and kept; the reference's `code > 0` test drops it, available with drop_zero_codes.
    zero = frames.copy()
    zero[0, 2] = 0
    np.testing.assert_array_equal(orpheus.tokens_to_frames(VOCAB, _audio_ids(zero)), zero)
    assert len(orpheus.tokens_to_frames(VOCAB, _audio_ids(zero), drop_zero_codes=True)) == 1
    assert orpheus.tokens_to_frames(VOCAB, []).shape == (0, 7)
    assert orpheus.tokens_to_frames(VOCAB, [VOCAB.audio_token_offset + 7 * 4096 + 50] * 7)[0, 0] >= 4096


def test_incremental_parser_counts_new_frames():
    frames = np.random.default_rng(1).integers(0, 4096, (3, 7))
    ids = _audio_ids(frames)
    parser = orpheus.AudioTokenParser(VOCAB)
    assert parser.push(ids[:5]) == 0
    assert parser.push(ids[5:16]) == 2
    assert parser.push([128009]) == 0
    assert parser.push(ids[16:]) == 1
    np.testing.assert_array_equal(parser.frames(), frames)


class _RecordingDecoder:
    """Stands in for SnacDecoder: audio sample s of window w is w * 1000 + the window's first code + s / 1e4."""

    samples_per_frame = 3

    def __init__(self):
        self.calls = []

    def decode_frames(self, codes, num_frames=None):
        self.calls.append([np.array(c) for c in codes])
        batch, n = codes[0].shape
        s = np.arange(n * self.samples_per_frame)
        return codes[0][:, :1] * 1000.0 + s[None, :] / 1e4


def test_stream_windows_follow_reference_slicing():
    frames = np.arange(8)[:, None] + np.zeros((1, 7), np.int64)  # frame i holds code i everywhere
    frames[5, 2] = 4096  # out of range: windows holding frame 5 are skipped
    windows = orpheus.stream_windows(frames, 3, 8)
    assert windows.shape == (5, 4, 7)
    np.testing.assert_array_equal(windows[:, :, 0], [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7]])
    decoder = _RecordingDecoder()
    chunks = orpheus.stream_window_audio(decoder, VOCAB, frames, 3, 8)
    assert len(decoder.calls) == 1 and decoder.calls[0][0].shape == (2, 4)  # one batched call, valid windows only
    assert chunks[2] is None and chunks[3] is None and chunks[4] is None
    np.testing.assert_allclose(chunks[0], 0 + np.arange(3, 6) / 1e4)  # samples [spf, 2 spf) of window 0
    np.testing.assert_allclose(chunks[1], 1000 + np.arange(3, 6) / 1e4)
    assert orpheus.stream_window_audio(decoder, VOCAB, frames, 4, 4) == []
    with pytest.raises(ValueError, match="first"):
        orpheus.stream_windows(frames, 2, 5)


def test_to_pcm16_matches_reference_scaling():
    audio = np.array([0.0, 0.5, -1.0, 1.0, -0.49999])
    np.testing.assert_array_equal(orpheus.to_pcm16(audio), (audio.astype(np.float32) * 32767).astype(np.int16))
    assert orpheus.to_pcm16(audio).dtype == np.int16
