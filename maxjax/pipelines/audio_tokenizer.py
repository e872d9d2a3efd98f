"""`AudioTokenizer`: AudioGenerationRequest -> AudioContext holding the Orpheus speech prompt (numpy only).

Prompt (see `maxjax.pipelines.orpheus.build_prompt`):
    [start_of_human] + tokens("{voice}: {input}") + [end_of_text, end_of_human, start_of_ai, start_of_speech]

Voice: the request has no voice field, so the voice rides on `model` as a suffix, `"<model>:<voice>"` (e.g.
`"orpheus:tara"`); without a suffix the tokenizer's default voice applies (none: the bare text). A voice is a name of
letters, digits, `_` or `-` starting with a letter; anything else, or a name outside `voices` when the tokenizer
was given a list, is a ValueError naming `model`.

Voice cloning (`audio_prompt_tokens` + `audio_prompt_transcription`, Orpheus's zero-shot layout): a finished turn of
the reference speaker goes first,
    [start_of_human] + tokens(transcription) + [end_of_text, end_of_human, start_of_ai, start_of_speech]
    + audio_prompt_tokens + [end_of_speech, end_of_ai]
followed by the usual prompt for `input`. `audio_prompt_tokens` are speech-token ids of the model's vocabulary
(`<custom_token_N>`, N >= 10), as the model emits them.

`prompt` (token ids, or a string tokenized as is, without added special tokens) replaces all of the above.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from maxjax.context import AudioContext, check_lora_name
from maxjax.interfaces import AudioGenerationRequest
from maxjax.interfaces.requests import AUDIO_INPUT_MAX_CHARS
from maxjax.pipelines.orpheus import TOKENS_PER_FRAME, OrpheusVocab, build_prompt, prompt_text
from maxjax.tokenizers.base import loaded_lora_names
from maxjax.tokenizers.checks import check_text

END_OF_AI_CUSTOM_TOKEN = 6  # <custom_token_6> closes an AI turn (used by voice-cloning prompts)
DEFAULT_MAX_NEW_TOKENS = 1200  # Orpheus's default: about 14 s of speech
_VOICE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def voice_of(model: str, default: str | None = None, voices: tuple[str, ...] | None = None) -> str | None:
    """The voice named by a request's `model` ("<model>:<voice>"), or `default`."""
    voice = model.rsplit(":", 1)[1] if isinstance(model, str) and ":" in model else default
    if voice is None or voice == "":
        return None
    if not _VOICE.fullmatch(voice):
        raise ValueError(f"model: voice {voice!r} has an unknown format (expected '<model>:<voice>' with a voice "
                         "name of letters, digits, '_' or '-', starting with a letter)")
    if voices is not None and voice not in voices:
        raise ValueError(f"model: unknown voice {voice!r}; this model's voices are {list(voices)}")
    return voice


class AudioTokenizer:
    """A `PipelineTokenizer` for text-to-speech over a text tokenizer (`maxjax.tokenizers.BaseTokenizer`).

    `max_new_tokens` caps the speech tokens of a request whose sampling params set none.
    """

    context_class = AudioContext
    lora_adapters: Any = None  # the speech stage's resident LoRA adapters (`.names`), set by load_audio_pipeline

    def __init__(self, tokenizer: Any, vocab: OrpheusVocab | None = None, *, voice: str | None = None,
                 voices: tuple[str, ...] | list[str] | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.tokenizer = tokenizer
        self.vocab = vocab or OrpheusVocab.from_tokenizer(getattr(tokenizer, "tokenizer", tokenizer))
        self.voices = None if voices is None else tuple(voices)
        self.voice = voice_of(f":{voice}" if voice else "", None, self.voices)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        self.tokenizer.max_length = value

    # ---- PipelineTokenizer ------------------------------------------------------------------------

    @property
    def eos(self) -> int:
        return self.vocab.end_of_speech

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.vocab.stop_token_ids)

    @property
    def expects_content_wrapping(self) -> bool:
        return False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    async def encode(self, prompt: str, add_special_tokens: bool = False) -> np.ndarray:
        return self.tokenizer.encode_text(prompt, add_special_tokens=add_special_tokens)

    async def decode(self, encoded: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self.tokenizer.decode_tokens(encoded, skip_special_tokens=skip_special_tokens)

    async def new_context(self, request: AudioGenerationRequest) -> AudioContext:
        return self.build_context(request)

    # ---- synchronous API ------------------------------------------------------------------------

    def _text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode_text(text, add_special_tokens=True)]

    def prompt_token_ids(self, request: AudioGenerationRequest) -> np.ndarray:
        """The speech prompt of a request (see the module docstring); ValueError naming the bad field."""
        if request.prompt is not None:
            return self._raw_prompt(request.prompt)
        text = request.input
        if text is not None:
            check_text("input", text)
        if text is None or not text.strip():
            raise ValueError("input: the text to speak is empty (give `input`, or a raw `prompt`)")
        if len(text) > AUDIO_INPUT_MAX_CHARS:
            raise ValueError(f"input is {len(text)} characters; the maximum is {AUDIO_INPUT_MAX_CHARS}")
        voice = voice_of(request.model, self.voice, self.voices)
        ids = build_prompt(self.vocab, self._text_ids(prompt_text(text, voice)))
        return np.asarray(self._cloning_prefix(request) + ids, np.int32)

    def _cloning_prefix(self, request: AudioGenerationRequest) -> list[int]:
        tokens = list(np.asarray(request.audio_prompt_tokens, np.int64).reshape(-1)) if len(
            request.audio_prompt_tokens) else []
        transcription = request.audio_prompt_transcription or ""
        if not tokens and not transcription:
            return []
        if not tokens or not transcription.strip():
            raise ValueError("audio_prompt_tokens and audio_prompt_transcription go together: a voice-cloning "
                             "prompt needs the reference speech tokens and their transcription")
        v = self.vocab
        lo, hi = v.audio_token_offset, v.audio_token_offset + TOKENS_PER_FRAME * v.codebook_size
        bad = [int(t) for t in tokens if not lo <= t < hi]
        if bad:
            raise ValueError(f"audio_prompt_tokens must be speech-token ids in [{lo}, {hi}), got {bad[:5]}")
        end_of_ai = v.custom_token_base + END_OF_AI_CUSTOM_TOKEN
        return build_prompt(v, self._text_ids(transcription)) + [int(t) for t in tokens] + [v.end_of_speech, end_of_ai]

    def _raw_prompt(self, prompt: Any) -> np.ndarray:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode_text(prompt, add_special_tokens=False)
        return self.tokenizer.check_token_ids(prompt)

    def build_context(self, request: AudioGenerationRequest) -> AudioContext:
        """An AudioContext for the request; every check happens before anything is built."""
        if not isinstance(request, AudioGenerationRequest):
            raise ValueError(f"request must be an AudioGenerationRequest, got {type(request).__name__}")
        prompt = self.prompt_token_ids(request)
        if prompt.size >= self.max_length:
            field = "prompt" if request.prompt is not None else "input"
            raise ValueError(f"{field}: the prompt is {prompt.size} tokens; the model's maximum length is "
                             f"{self.max_length} (prompt plus at least one speech token)")
        buffer = request.buffer_speech_tokens
        if buffer is not None:
            buffer = np.asarray(buffer)
            if buffer.ndim != 1 or (buffer.size and not np.issubdtype(buffer.dtype, np.integer)):
                raise ValueError("buffer_speech_tokens must be a 1-D array of token ids")
        params = request.sampling_params
        max_new = params.max_new_tokens if params.max_new_tokens is not None else self.max_new_tokens
        return AudioContext(
            request.request_id, prompt, max_length=min(self.max_length, prompt.size + max_new),
            eos_token_ids=set(self.vocab.stop_token_ids), sampling_params=params,
            audio_prompt_tokens=np.asarray(request.audio_prompt_tokens, np.int32).reshape(-1),
            audio_prompt_transcription=request.audio_prompt_transcription, buffer_speech_tokens=buffer,
            streaming=request.streaming, lora_name=check_lora_name(request.lora, loaded_lora_names(self), "lora"))
