"""Orpheus text-to-speech token conventions (numpy only): prompt layout, audio tokens -> SNAC frames, streaming.

Orpheus is a Llama LM whose vocabulary is extended with `<custom_token_N>` (id = custom_token_base + N). N = 1..5
are markers (speech start/end, human turn start/end, AI turn start); N >= 10 encode SNAC codes: the i-th audio
token of a stream carries code = id - audio_token_offset - (i mod 7) * codebook_size, and each frame of 7 codes
maps to the three SNAC levels as [t0], [t1, t4], [t2, t3, t5, t6].

Parsing follows the reference streaming decoder (canopyai/Orpheus-TTS `orpheus_tts/decoder.py`): tokens that are
not custom tokens are skipped, as are custom tokens whose code is negative (the markers, e.g. end of speech);
neither advances the position i. Every accepted token advances i, even one whose code lands at or beyond the
codebook size; a window holding such a code is not decoded. Two deliberate differences: the reference also drops
code 0 (its test is `code > 0`), which shifts every later position, so maxjax keeps code 0 unless
`drop_zero_codes=True`; and the reference accepts code == codebook_size (out of range for the codebook), which
maxjax rejects like any other out-of-range code.

Streaming: once frame i (0-based, i >= 3) completes, the reference decodes frames [i-3, i] and keeps samples
[spf, 2 spf) (spf = samples per frame, 2048 at 24 kHz), i.e. the audio of frame i-2 with one frame of left context
and two of right context. Frame 0, the last two frames and any trailing partial frame are never emitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

TOKENS_PER_FRAME = 7
# Position of each of a frame's 7 codes within SNAC levels 0, 1, 2 (coarse -> fine).
LEVEL_SLOTS = ((0,), (1, 4), (2, 3, 5, 6))
STREAM_WINDOW_FRAMES = 4  # the reference decodes the last 28 tokens
STREAM_KEEP_FRAME = 1  # ... and keeps the audio of the window's second frame (samples 2048:4096)


@dataclasses.dataclass(frozen=True)
class OrpheusVocab:
    """Special token ids of an Orpheus tokenizer. `default()` is the Llama-3 based layout of the released models."""

    custom_token_base: int = 128256  # <custom_token_0>
    start_of_speech: int = 128257  # <custom_token_1>
    end_of_speech: int = 128258  # <custom_token_2>
    start_of_human: int = 128259  # <custom_token_3>
    end_of_human: int = 128260  # <custom_token_4>
    start_of_ai: int = 128261  # <custom_token_5>
    end_of_text: int = 128009  # <|eot_id|>
    audio_token_offset: int = 128266  # <custom_token_10>
    codebook_size: int = 4096

    @classmethod
    def default(cls) -> "OrpheusVocab":
        return cls()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, codebook_size: int = 4096) -> "OrpheusVocab":
        """Read the ids from a tokenizer: a HF tokenizer (`convert_tokens_to_ids`), a `tokenizers.Tokenizer`
        (`token_to_id`), anything with `get_vocab()`, or a plain token -> id mapping."""
        lookup = _token_lookup(tokenizer)

        def custom(n: int) -> int:
            return lookup(f"<custom_token_{n}>")

        base = custom(0)
        vocab = cls(
            custom_token_base=base, start_of_speech=custom(1), end_of_speech=custom(2), start_of_human=custom(3),
            end_of_human=custom(4), start_of_ai=custom(5), end_of_text=lookup("<|eot_id|>"),
            audio_token_offset=custom(10), codebook_size=codebook_size,
        )
        last = custom(10 + TOKENS_PER_FRAME * codebook_size - 1)
        if last != vocab.audio_token_offset + TOKENS_PER_FRAME * codebook_size - 1:
            raise ValueError("tokenizer: <custom_token_N> ids are not consecutive")
        return vocab

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.end_of_speech,)


def _token_lookup(tokenizer: Any):
    if isinstance(tokenizer, Mapping):
        table = tokenizer
    elif hasattr(tokenizer, "get_vocab"):
        table = tokenizer.get_vocab()
    else:
        table = None
    unk = getattr(tokenizer, "unk_token_id", None)

    def lookup(token: str) -> int:
        if table is not None:
            found = table.get(token)
        elif hasattr(tokenizer, "token_to_id"):
            found = tokenizer.token_to_id(token)
        elif hasattr(tokenizer, "convert_tokens_to_ids"):
            found = tokenizer.convert_tokens_to_ids(token)
        else:
            raise ValueError("tokenizer: expected a vocabulary mapping or a tokenizer with get_vocab/token_to_id")
        if found is None or (unk is not None and found == unk):
            raise ValueError(f"tokenizer: no token {token!r} (not an Orpheus tokenizer?)")
        return int(found)

    return lookup


# ---------------------------------------------------------------------------------------------- prompt


def prompt_text(text: str, voice: str | None = None) -> str:
    """The text the reference tokenizes: "{voice}: {text}", or the bare text without a voice."""
    return f"{voice}: {text}" if voice else text


def build_prompt(vocab: OrpheusVocab, text_token_ids: Sequence[int]) -> list[int]:
    """[start_of_human] + tokens(prompt_text(...)) + [end_of_text, end_of_human, start_of_ai, start_of_speech].

    text_token_ids are what the model's tokenizer gives for `prompt_text(text, voice)` with its default special
    tokens: for the Llama-3 tokenizer that includes the leading <|begin_of_text|>, as in the reference.
    """
    return [vocab.start_of_human, *(int(t) for t in text_token_ids),
            vocab.end_of_text, vocab.end_of_human, vocab.start_of_ai, vocab.start_of_speech]


# ---------------------------------------------------------------------------------------------- tokens -> frames


class AudioTokenParser:
    """Incremental parse of generated token ids into the stream of accepted SNAC codes (reference filtering)."""

    def __init__(self, vocab: OrpheusVocab, *, drop_zero_codes: bool = False):
        self.vocab = vocab
        self.min_code = 1 if drop_zero_codes else 0
        self.codes: list[int] = []

    def push(self, token_ids: Sequence[int] | np.ndarray) -> int:
        """Consume token ids; returns how many new complete frames they finished."""
        before = len(self.codes) // TOKENS_PER_FRAME
        v = self.vocab
        for token in np.asarray(token_ids, np.int64).reshape(-1).tolist():
            if token < v.custom_token_base:
                continue  # a text or Llama special token: not an audio token
            code = token - v.audio_token_offset - (len(self.codes) % TOKENS_PER_FRAME) * v.codebook_size
            if code >= self.min_code:
                self.codes.append(code)
        return len(self.codes) // TOKENS_PER_FRAME - before

    @property
    def num_frames(self) -> int:
        return len(self.codes) // TOKENS_PER_FRAME

    def frames(self) -> np.ndarray:
        """Complete frames so far, [n, 7] int32 (codes may lie outside the codebook; see `frames_valid`)."""
        n = self.num_frames
        return np.asarray(self.codes[: n * TOKENS_PER_FRAME], np.int64).reshape(n, TOKENS_PER_FRAME).astype(np.int32)


def tokens_to_frames(vocab: OrpheusVocab, token_ids: Sequence[int] | np.ndarray, *, drop_zero_codes: bool = False) -> np.ndarray:
    """Generated token ids -> complete frames [n, 7] int32; a trailing partial frame is left out."""
    parser = AudioTokenParser(vocab, drop_zero_codes=drop_zero_codes)
    parser.push(token_ids)
    return parser.frames()


def frames_valid(vocab: OrpheusVocab, frames: np.ndarray) -> np.ndarray:
    """[n, 7] -> [n] bool: every code of the frame lies in [0, codebook_size)."""
    frames = np.asarray(frames)
    return np.all((frames >= 0) & (frames < vocab.codebook_size), axis=-1)


def frames_to_codes(frames: np.ndarray) -> list[np.ndarray]:
    """Frames [..., n, 7] -> SNAC codes per level: [..., n], [..., 2n], [..., 4n] (int32)."""
    frames = np.asarray(frames, np.int32)
    if frames.shape[-1] != TOKENS_PER_FRAME:
        raise ValueError(f"frames: expected a last axis of {TOKENS_PER_FRAME}, got shape {frames.shape}")
    lead = frames.shape[:-1]
    return [frames[..., list(slots)].reshape(*lead[:-1], lead[-1] * len(slots)) for slots in LEVEL_SLOTS]


# ---------------------------------------------------------------------------------------------- streaming


class FrameDecoder(Protocol):
    """What streaming needs from a SNAC decoder (`maxjax.runtime.snac_decoder.SnacDecoder`)."""

    samples_per_frame: int

    def decode_frames(self, codes: Sequence[np.ndarray], num_frames=None) -> np.ndarray: ...


def stream_windows(frames: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Windows for the streaming chunks of frames first..stop-1: [W, 4, 7], window j = frames[i-3 : i+1]."""
    frames = np.asarray(frames, np.int32)
    if first < STREAM_WINDOW_FRAMES - 1 or stop > len(frames) or first > stop:
        raise ValueError(f"first/stop: need {STREAM_WINDOW_FRAMES - 1} <= first <= stop <= {len(frames)}, got {first}, {stop}")
    ends = np.arange(first, stop)
    offsets = np.arange(-(STREAM_WINDOW_FRAMES - 1), 1)
    return frames[ends[:, None] + offsets[None, :]]  # [W, 4, 7]


def stream_window_audio(
    decoder: FrameDecoder, vocab: OrpheusVocab, frames: np.ndarray, first: int, stop: int
) -> list[np.ndarray | None]:
    """Streaming audio chunks emitted when frames first..stop-1 complete (each index >= 3), as the reference:
    chunk i = decode(frames[i-3 : i+1])[spf : 2 spf] float32, or None where the window holds an out-of-range
    code (the reference emits nothing then). All valid windows go to the decoder in one batched call."""
    windows = stream_windows(frames, first, stop)  # [W, 4, 7]
    ok = np.all(frames_valid(vocab, windows), axis=-1)  # [W]
    chunks: list[np.ndarray | None] = [None] * len(windows)
    if ok.any():
        spf = decoder.samples_per_frame
        audio = decoder.decode_frames(frames_to_codes(windows[ok]))  # [W_ok, 4 * spf]
        kept = audio[:, STREAM_KEEP_FRAME * spf : (STREAM_KEEP_FRAME + 1) * spf]
        for j, chunk in zip(np.flatnonzero(ok), kept):
            chunks[j] = chunk
    return chunks


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] -> int16 PCM, scaled and truncated as the reference (audio * 32767 -> int16)."""
    return (np.asarray(audio, np.float32) * 32767).astype(np.int16)
