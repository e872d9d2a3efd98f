"""Output types: what pipelines return per request, and what the scheduler wraps them in."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import numpy as np

from .status import GenerationStatus, SchedulerStatus


@dataclass
class LogProbabilities:
    """Log-probabilities for output tokens (data only).

    ``token_log_probabilities[i]`` is the sampled token's log-probability at step ``i``;
    ``top_log_probabilities[i]`` maps the top-N token ids at step ``i`` to theirs.
    """

    token_log_probabilities: list[float]
    top_log_probabilities: list[dict[int, float]]


@dataclass
class TextGenerationOutput:
    """New tokens for one request from one ``next_token`` call, with its status."""

    request_id: str
    tokens: list[int]
    final_status: GenerationStatus
    log_probabilities: list[LogProbabilities] | None = None

    @property
    def is_done(self) -> bool:
        return self.final_status.is_done


@dataclass
class EmbeddingsOutput:
    """One input's embedding vector."""

    embeddings: np.ndarray

    @property
    def is_done(self) -> bool:
        """Always True: embedding is a single-step operation."""
        return True


@dataclass(kw_only=True)
class AudioGenerationMetadata:
    """Structured metadata of one generated audio chunk."""

    sample_rate: int | None = None
    duration: float | None = None
    chunk_id: int | None = None
    timestamp: str | None = None
    final_chunk: bool | None = None
    model_name: str | None = None
    request_id: str | None = None
    tokens_generated: int | None = None
    processing_time: float | None = None
    echo: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class AudioGeneratorOutput:
    """One audio chunk produced by an AudioGenerator step."""

    audio_data: np.ndarray
    metadata: AudioGenerationMetadata
    is_done: bool
    buffer_speech_tokens: np.ndarray | None = None


@dataclass
class AudioGenerationResponse:
    """Response of the audio generation API: status, audio (if any) and buffered speech tokens."""

    final_status: GenerationStatus
    audio: np.ndarray | None = None
    buffer_speech_tokens: np.ndarray | None = None

    @property
    def is_done(self) -> bool:
        return self.final_status.is_done

    @property
    def has_audio_data(self) -> bool:
        return self.audio is not None

    @property
    def audio_data(self) -> np.ndarray:
        assert self.audio is not None, "this response carries no audio data"
        return self.audio


OutputT = TypeVar("OutputT")


@dataclass
class SchedulerResult(Generic[OutputT]):
    """A pipeline output as the scheduler reports it: its status plus the (possibly partial) result."""

    status: SchedulerStatus
    result: OutputT | None = None

    @classmethod
    def active(cls, result: OutputT) -> "SchedulerResult[OutputT]":
        return cls(status=SchedulerStatus.ACTIVE, result=result)

    @classmethod
    def cancelled(cls) -> "SchedulerResult[OutputT]":
        return cls(status=SchedulerStatus.CANCELLED, result=None)

    @classmethod
    def complete(cls, result: OutputT) -> "SchedulerResult[OutputT]":
        return cls(status=SchedulerStatus.COMPLETE, result=result)

    @property
    def stop_stream(self) -> bool:
        """True when no more data will follow (CANCELLED or COMPLETE)."""
        return self.status is not SchedulerStatus.ACTIVE


@dataclass
class SharedMemoryArray:
    """Placeholder for a numpy array kept in shared memory (name, shape, dtype) during serialization."""

    name: str
    shape: tuple[int, ...]
    dtype: str
