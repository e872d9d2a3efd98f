"""Structural interfaces (``typing.Protocol``): contexts, pipelines, tokenizers, outputs.

Runtime checks (``isinstance(x, InputContext)``) look members up statically, without
running properties, so an object whose property raises (``cache_seq_id`` while
unassigned) still conforms, as on Python >= 3.12.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from .outputs import AudioGenerationResponse, EmbeddingsOutput, LogProbabilities, TextGenerationOutput
from .requests import RequestID, TextGenerationInputs
from .sampling import SamplingParams
from .status import GenerationStatus

_MISSING = object()
_PROTOCOL_BASES = {"Protocol", "Generic", "object"}


def _protocol_members(cls: type) -> set[str]:
    members: set[str] = set()
    for base in cls.__mro__:
        if base.__name__ in _PROTOCOL_BASES or not getattr(base, "_is_protocol", False):
            continue
        members.update(name for name in vars(base) if not name.startswith("_"))
        members.update(getattr(base, "__annotations__", {}).keys())
    return members


class _StaticProtocolMeta(type(Protocol)):
    """Protocol metaclass whose isinstance check never evaluates properties."""

    def __instancecheck__(cls, instance: Any) -> bool:
        if not getattr(cls, "_is_protocol", False) or not getattr(cls, "_is_runtime_protocol", False):
            return super().__instancecheck__(instance)
        if cls in type(instance).__mro__:
            return True
        return all(inspect.getattr_static(instance, name, _MISSING) is not _MISSING
                   for name in _protocol_members(cls))


@runtime_checkable
class PipelineOutput(Protocol, metaclass=_StaticProtocolMeta):
    """Anything a pipeline returns per request: it can say whether the operation is done."""

    @property
    def is_done(self) -> bool: ...


@runtime_checkable
class InputContext(Protocol, metaclass=_StaticProtocolMeta):
    """A request's model input state across steps (see ``maxjax.context.TextContext``).

    Token array layout (it grows in multiples of CHUNK_SIZE)::

        | completed          | next_tokens   |              | preallocated |
        ^ 0                  ^ start_idx     ^ active_idx   ^ end_idx      ^ len(tokens)

    ``start_idx <= committed_idx <= active_idx <= end_idx``.
    """

    @property
    def request_id(self) -> RequestID: ...
    @property
    def tokens(self) -> np.ndarray: ...
    @property
    def all_tokens(self) -> np.ndarray: ...
    @property
    def prompt_tokens(self) -> np.ndarray: ...
    @property
    def generated_tokens(self) -> np.ndarray: ...
    @property
    def next_tokens(self) -> np.ndarray: ...
    @property
    def start_idx(self) -> int: ...
    @property
    def committed_idx(self) -> int: ...
    @property
    def active_idx(self) -> int: ...
    @property
    def end_idx(self) -> int: ...
    @property
    def active_length(self) -> int: ...
    @property
    def current_length(self) -> int: ...
    @property
    def max_length(self) -> int | None: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def eos_token_ids(self) -> set[int]: ...
    @property
    def sampling_params(self) -> SamplingParams: ...
    @property
    def log_probabilities(self) -> int: ...
    @property
    def log_probabilities_echo(self) -> bool: ...
    @property
    def json_schema(self) -> Any: ...
    @property
    def matcher(self) -> Any: ...
    @property
    def status(self) -> GenerationStatus: ...
    @property
    def is_done(self) -> bool: ...
    @property
    def is_ce(self) -> bool: ...
    @property
    def is_initial_prompt(self) -> bool: ...
    @property
    def is_assigned_to_cache(self) -> bool: ...
    @property
    def cache_seq_id(self) -> int: ...

    def set_matcher(self, matcher: Any) -> None: ...
    def update_status(self, status: GenerationStatus) -> None: ...
    def assign_to_cache(self, cache_seq_id: int) -> None: ...
    def unassign_from_cache(self) -> None: ...
    def set_draft_offset(self, idx: int) -> None: ...
    def set_token_indices(self, start_idx: int | None = None, active_idx: int | None = None,
                          end_idx: int | None = None, committed_idx: int | None = None) -> None: ...
    def bump_token_indices(self, start_idx: int = 0, active_idx: int = 0,
                           end_idx: int = 0, committed_idx: int = 0) -> None: ...
    def update(self, new_token: int, log_probabilities: LogProbabilities | None = None) -> None: ...
    def jump_ahead(self, new_token: int) -> None: ...
    def rollback(self, idx: int) -> None: ...
    def reset(self) -> None: ...
    def compute_num_available_steps(self, max_seq_len: int) -> int: ...
    def get_min_token_logit_mask(self, num_steps: int) -> list[np.ndarray]: ...
    def outstanding_completion_tokens(self) -> list[tuple[int, LogProbabilities | None]]: ...


ContextT = TypeVar("ContextT", contravariant=True)
RequestT = TypeVar("RequestT", contravariant=True)


@runtime_checkable
class TokenGenerator(Protocol[ContextT], metaclass=_StaticProtocolMeta):
    """A text model: ``num_steps`` new tokens for every context of a batch per call."""

    def next_token(self, inputs: TextGenerationInputs[ContextT]) -> dict[RequestID, TextGenerationOutput]: ...

    def release(self, request_id: RequestID) -> None: ...


@runtime_checkable
class EmbeddingsGenerator(Protocol[ContextT], metaclass=_StaticProtocolMeta):
    """An embedding model: one vector per context of a batch."""

    def encode(self, batch: dict[RequestID, ContextT]) -> dict[RequestID, EmbeddingsOutput]: ...


@runtime_checkable
class AudioGenerator(Protocol[ContextT], metaclass=_StaticProtocolMeta):
    """A speech model: the next audio chunk for every context of a batch per call."""

    def next_chunk(self, batch: dict[RequestID, ContextT]) -> dict[RequestID, AudioGenerationResponse]: ...

    def release(self, context: ContextT) -> None: ...

    @property
    def decoder_sample_rate(self) -> int: ...

    @property
    def prev_num_steps(self) -> int: ...


@runtime_checkable
class PipelineTokenizer(Protocol[ContextT, RequestT], metaclass=_StaticProtocolMeta):  # type: ignore[misc]
    """Turns requests into contexts and tokens into text (async, as MAX's server calls it)."""

    @property
    def eos(self) -> int: ...

    @property
    def expects_content_wrapping(self) -> bool: ...

    async def new_context(self, request: RequestT) -> ContextT: ...

    async def encode(self, prompt: Any, add_special_tokens: bool = False) -> Any: ...

    async def decode(self, encoded: Any, **kwargs: Any) -> str: ...
