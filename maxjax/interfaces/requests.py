"""Request types: what a client sends to a text or audio pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, TypedDict

import numpy as np

from .sampling import SamplingParams

RequestID = str
"""A request's unique identifier (alias of ``str``)."""

AUDIO_INPUT_MAX_CHARS = 4096


@dataclass(frozen=True)
class Request:
    """Base of every request: a unique identifier to track it through the system."""

    request_id: RequestID


class TextGenerationRequestFunction(TypedDict):
    """A function definition a tool exposes to the model."""

    name: str
    description: str
    parameters: dict


class TextGenerationRequestTool(TypedDict):
    """A tool the model may call: its type (usually ``"function"``) and function."""

    type: str
    function: TextGenerationRequestFunction


class TextGenerationResponseFormat(TypedDict):
    """Structured-output format: ``{"type": "json_schema", "json_schema": {...}}`` or ``json_object``."""

    type: str
    json_schema: dict


class TextGenerationRequestMessage(TypedDict):
    """One chat turn; ``content`` is a string or a list of typed parts."""

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


@dataclass(frozen=True)
class TextGenerationRequest(Request):
    """A completion (``prompt``) or chat (``messages``) request."""

    index: int
    model_name: str
    lora_name: str | None = None
    prompt: str | Sequence[int] | None = None
    messages: list[TextGenerationRequestMessage] | None = None
    images: list[bytes] | None = None
    tools: list[TextGenerationRequestTool] | None = None
    response_format: TextGenerationResponseFormat | None = None
    timestamp_ns: int = 0
    request_path: str = "/"
    logprobs: int = 0
    echo: bool = False
    stop: str | list[str] | None = None
    chat_template_options: dict[str, Any] | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0:
            raise ValueError(f"logprobs must be an int >= 0, got {self.logprobs!r}")
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        if not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}")


def _check_prompt(prompt: object) -> None:
    """A prompt is text or a sequence of token ids: bytes, dicts, sets and scalars are refused, not iterated."""
    if prompt is None or isinstance(prompt, str):
        return
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not (prompt.size == 0 or np.issubdtype(prompt.dtype, np.integer)):
            raise ValueError(f"prompt must be a str or a 1-D sequence of int token ids, got an array of shape "
                             f"{prompt.shape} and dtype {prompt.dtype}")
        return
    if isinstance(prompt, (bytes, bytearray, memoryview)) or not isinstance(prompt, Sequence):
        raise ValueError(f"prompt must be a str or a sequence of int token ids, got {type(prompt).__name__}")
    bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    if bad:
        raise ValueError(f"prompt token ids must be ints, got {bad[:3]!r}")


@dataclass(frozen=True)
class AudioGenerationRequest(Request):
    """A text-to-speech request: ``input`` text (at most 4096 characters) or a raw ``prompt``."""

    index: int
    model: str
    lora: str | None = None
    input: str | None = None
    audio_prompt_tokens: list[int] = field(default_factory=list)
    audio_prompt_transcription: str = ""
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    _assistant_message_override: str | None = None
    prompt: list[int] | str | None = None
    streaming: bool = True
    buffer_speech_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        if self.input is not None:
            if not isinstance(self.input, str):
                raise ValueError(f"input must be a str, got {type(self.input).__name__}")
            if len(self.input) > AUDIO_INPUT_MAX_CHARS:
                raise ValueError(f"input is {len(self.input)} characters; the maximum is {AUDIO_INPUT_MAX_CHARS}")
        if not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}")


ContextT = TypeVar("ContextT")


@dataclass
class TextGenerationInputs(Generic[ContextT]):
    """One call's work for a TokenGenerator: the contexts by request id and how many tokens to generate."""

    batch: dict[RequestID, ContextT]
    num_steps: int

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
