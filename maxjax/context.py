"""Per-request model input state: the concrete ``InputContext`` (numpy only, no JAX).

Token array layout (the array grows in multiples of ``chunk_size``)::

    |  completed       |  next_tokens  |  rest of prompt  |  preallocated  |
    0        start_idx ^    active_idx ^         end_idx ^    len(tokens) ^

``start_idx <= active_idx <= end_idx``; ``0 <= committed_idx <= active_idx``
(``committed_idx`` is the prefix held in a prefix cache; 0 when there is none).

Life of a request:

* prefill: ``next_tokens`` is the whole prompt. For chunked prefill the runtime
  shrinks the window (``set_token_indices(active_idx=start_idx + chunk)``), runs the
  chunk, then moves it (``bump_token_indices(start_idx=chunk, active_idx=chunk)``, or
  ``update(token)``, which discards the sample and moves the window to the rest of the
  prompt, as MAX does).
* decode: ``update(token)`` appends at ``end_idx`` and makes the new token the window,
  so ``next_tokens`` is that single token. It also sets the status: END_OF_SEQUENCE on
  an eos or stop token id (that token is not returned to the user), MAXIMUM_LENGTH when
  ``max_length`` or ``max_new_tokens`` is reached (that token is returned). Stop strings
  need text, so the pipeline checks them and calls ``update_status``. Updates that
  arrive after the context is done (the tail of a multi-step decode) are dropped.
* eviction: ``reset()`` makes every token so far the new prompt.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any

import numpy as np

from maxjax.interfaces import GenerationStatus, LogProbabilities, SamplingParams, TextGenerationOutput

CHUNK_SIZE = 128


def _check_index(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_lora_name(name: object, loaded: Collection[str] | None = None, field: str = "lora_name") -> str | None:
    """``name`` if it is None or (when ``loaded`` is given) a loaded adapter; ValueError naming it otherwise."""
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"{field} must be a non-empty str or None, got {name!r}")
    if name is not None and loaded is not None and name not in loaded:
        raise ValueError(f"{field} {name!r} is not a loaded LoRA adapter; loaded: {sorted(loaded) or 'none'}")
    return name


class TextContext:
    """The state of one text request across steps.

    Args:
        request_id: the request's id.
        tokens: 1-D prompt token ids (copied into an int32 array).
        max_length: the longest the sequence (prompt + generated) may become; must exceed
            the prompt length. ``sampling_params.max_new_tokens`` also applies.
        eos_token_ids: ids that end the sequence (ignored when ``sampling_params.ignore_eos``;
            ``sampling_params.stop_token_ids`` end it always).
        sampling_params: the request's sampling parameters.
        log_probabilities: top-N log-probabilities to return per token (0: none).
        log_probabilities_echo: also return log-probabilities of the prompt tokens.
        json_schema: structured-output schema (raw, compiled later by the runtime).
        stop: stop strings, checked by the pipeline on the detokenized text.
        lora_name: the LoRA adapter to generate with (None: the base model).
        chunk_size: the token array grows in multiples of this.
    """

    def __init__(
        self,
        request_id: str,
        tokens: np.ndarray | list[int],
        *,
        max_length: int,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        sampling_params: SamplingParams | None = None,
        log_probabilities: int = 0,
        log_probabilities_echo: bool = False,
        json_schema: Any = None,
        stop: list[str] | None = None,
        lora_name: str | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        prompt = np.asarray(tokens)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D array, got shape {prompt.shape}")
        if not np.issubdtype(prompt.dtype, np.integer) or prompt.min() < 0:
            raise ValueError("tokens must be non-negative integer ids")
        if _check_index("chunk_size", chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if _check_index("max_length", max_length) <= prompt.size:
            raise ValueError(f"max_length ({max_length}) must exceed the prompt length ({prompt.size})")
        if _check_index("log_probabilities", log_probabilities) < 0:
            raise ValueError(f"log_probabilities must be >= 0, got {log_probabilities}")
        sampling_params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")

        self._request_id = request_id
        self._chunk_size = int(chunk_size)
        size = -(-prompt.size // self._chunk_size) * self._chunk_size
        self._tokens = np.zeros(size, dtype=np.int32)
        self._tokens[: prompt.size] = prompt

        self._start_idx = 0
        self._active_idx = prompt.size
        self._end_idx = prompt.size
        self._committed_idx = 0
        self._prompt_len = prompt.size  # moves on reset()
        self._initial_prompt_len = prompt.size  # never moves: counts generated tokens across evictions
        self._completion_start_idx = prompt.size  # [start, end) generated but not yet returned
        self._completion_end_idx = prompt.size
        self._log_probabilities_data: dict[int, LogProbabilities] = {}

        self._max_length = int(max_length)
        self._eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._sampling_params = sampling_params
        self._log_probabilities = int(log_probabilities)
        self._log_probabilities_echo = bool(log_probabilities_echo)
        self._json_schema = json_schema
        self._stop = list(stop) if stop else []
        self._lora_name = check_lora_name(lora_name)
        self._matcher: Any = None
        self._status = GenerationStatus.ACTIVE
        self._is_initial_prompt = True
        self._cache_seq_id: int | None = None
        self._draft_offset = 0

    # ---- fixed request attributes -------------------------------------------------------------

    @property
    def request_id(self) -> str:
        return self._request_id

    @property
    def max_length(self) -> int:
        """The maximum length of this sequence (prompt + generated)."""
        return self._max_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end the sequence now: eos ids (unless ``ignore_eos``) and ``stop_token_ids``."""
        extra = frozenset(self._sampling_params.stop_token_ids or ())
        return extra if self._sampling_params.ignore_eos else self._eos_token_ids | extra

    @property
    def stop(self) -> list[str]:
        """Stop strings (request ``stop`` merged with ``sampling_params.stop``)."""
        return self._stop

    @property
    def sampling_params(self) -> SamplingParams:
        return self._sampling_params

    @property
    def min_tokens(self) -> int:
        """The minimum number of new tokens to generate."""
        return self._sampling_params.min_new_tokens

    @property
    def log_probabilities(self) -> int:
        return self._log_probabilities

    @property
    def log_probabilities_echo(self) -> bool:
        return self._log_probabilities_echo

    @property
    def lora_name(self) -> str | None:
        return self._lora_name

    @property
    def json_schema(self) -> Any:
        return self._json_schema

    @property
    def matcher(self) -> Any:
        """Grammar matcher for structured output (e.g. ``llguidance.LLMatcher``), or None."""
        return self._matcher

    def set_matcher(self, matcher: Any) -> None:
        """Set the matcher; ``update``/``jump_ahead`` then feed it every accepted token."""
        self._matcher = matcher

    def set_draft_offset(self, idx: int) -> None:
        self._draft_offset = _check_index("idx", idx)

    # ---- token array ----------------------------------------------------------------------------

    @property
    def tokens(self) -> np.ndarray:
        """The whole token buffer, preallocated tail included; use ``all_tokens`` for the sequence."""
        return self._tokens

    @property
    def all_tokens(self) -> np.ndarray:
        return self._tokens[: self._end_idx]

    @property
    def prompt_tokens(self) -> np.ndarray:
        return self._tokens[: self._prompt_len]

    @property
    def generated_tokens(self) -> np.ndarray:
        """Tokens after the prompt (since the last ``reset``)."""
        return self._tokens[self._prompt_len: self._end_idx]

    @property
    def num_generated(self) -> int:
        """Tokens generated since the request began (survives ``reset``); drives min/max new tokens."""
        return self._end_idx - self._initial_prompt_len

    @property
    def next_tokens(self) -> np.ndarray:
        """The tokens to run this iteration: ``tokens[start_idx:active_idx]``."""
        return self._tokens[self._start_idx: self._active_idx]

    @property
    def start_idx(self) -> int:
        return self._start_idx

    @property
    def active_idx(self) -> int:
        return self._active_idx

    @property
    def end_idx(self) -> int:
        return self._end_idx

    @property
    def committed_idx(self) -> int:
        return self._committed_idx

    @property
    def active_length(self) -> int:
        """Tokens input this iteration: the prompt (chunk) during prefill, 1 during decode."""
        return self._active_idx - self._start_idx

    @property
    def current_length(self) -> int:
        """The sequence length, completed and active tokens included (``end_idx``)."""
        return self._end_idx

    @property
    def is_ce(self) -> bool:
        """True while prompt tokens remain to be encoded (context encoding)."""
        return self._start_idx < self._prompt_len

    @property
    def is_initial_prompt(self) -> bool:
        """True until the first token is appended (and again after ``reset``)."""
        return self._is_initial_prompt

    def set_token_indices(self, start_idx: int | None = None, active_idx: int | None = None,
                          end_idx: int | None = None, committed_idx: int | None = None) -> None:
        """Set the token indices without changing the token array."""
        start = self._start_idx if start_idx is None else _check_index("start_idx", start_idx)
        active = self._active_idx if active_idx is None else _check_index("active_idx", active_idx)
        end = self._end_idx if end_idx is None else _check_index("end_idx", end_idx)
        committed = self._committed_idx if committed_idx is None else _check_index("committed_idx", committed_idx)
        if not 0 <= start < active:
            raise ValueError(f"start_idx ({start}) must be >= 0 and below active_idx ({active})")
        if active > end:
            raise ValueError(f"active_idx ({active}) must not exceed end_idx ({end})")
        if end > self._tokens.size:
            raise ValueError(f"end_idx ({end}) is past the token array ({self._tokens.size})")
        if not 0 <= committed <= active:
            raise ValueError(f"committed_idx ({committed}) must be in [0, active_idx={active}]")
        self._start_idx, self._active_idx, self._end_idx, self._committed_idx = start, active, end, committed

    def bump_token_indices(self, start_idx: int = 0, active_idx: int = 0, end_idx: int = 0,
                           committed_idx: int = 0) -> None:
        """Move the token indices by the given amounts without changing the token array."""
        self.set_token_indices(
            start_idx=self._start_idx + _check_index("start_idx", start_idx),
            active_idx=self._active_idx + _check_index("active_idx", active_idx),
            end_idx=self._end_idx + _check_index("end_idx", end_idx),
            committed_idx=self._committed_idx + _check_index("committed_idx", committed_idx),
        )

    def _append(self, token: int) -> None:
        if self._end_idx >= self._tokens.size:
            grown = np.zeros(self._tokens.size + self._chunk_size, dtype=np.int32)
            grown[: self._end_idx] = self._tokens[: self._end_idx]
            self._tokens = grown
        self._tokens[self._end_idx] = token
        self._end_idx += 1
        self._is_initial_prompt = False

    def _accept(self, token: int, log_probabilities: LogProbabilities | None) -> None:
        """Bookkeeping shared by update/jump_ahead once the token is in the array."""
        position = self._end_idx - 1
        if log_probabilities is not None:
            self._log_probabilities_data[position] = log_probabilities
        if self._matcher is not None and not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar matcher rejected token {token} for request {self._request_id!r}")
        max_new = self._sampling_params.max_new_tokens
        if token in self.stop_token_ids:
            self._status = GenerationStatus.END_OF_SEQUENCE  # the stop token itself is not returned
            return
        self._completion_end_idx = self._end_idx
        if self._end_idx >= self._max_length or (max_new is not None and self.num_generated >= max_new):
            self._status = GenerationStatus.MAXIMUM_LENGTH

    def update(self, new_token: int, log_probabilities: LogProbabilities | None = None) -> None:
        """Append a sampled token at ``end_idx``; it becomes the next (single-token) window.

        Mid-prompt (chunked prefill, ``active_idx < end_idx``) the sample is discarded and
        the window moves to the rest of the prompt.
        """
        if self._active_idx < self._end_idx:
            self._start_idx, self._active_idx = self._active_idx, self._end_idx
            return
        if self._status.is_done:
            return
        token = _check_index("new_token", new_token)
        self._append(token)
        self._start_idx = self._active_idx
        self._active_idx = self._end_idx
        self._accept(token, log_probabilities)

    def jump_ahead(self, new_token: int) -> None:
        """Append a token that is known without sampling (grammar fast-forward); it is returned
        to the user and joins the current window (``start_idx`` stays)."""
        if self._status.is_done:
            return
        token = _check_index("new_token", new_token)
        self._append(token)
        self._active_idx = self._end_idx
        self._accept(token, None)

    def rollback(self, idx: int) -> None:
        """Remove the last ``idx`` tokens (rejected draft tokens); generated tokens only."""
        n = _check_index("idx", idx)
        if n < 0:
            raise ValueError(f"idx must be >= 0, got {n}")
        new_end = self._end_idx - n
        if new_end < self._prompt_len:
            raise ValueError(f"cannot roll back {n} tokens: only {self._end_idx - self._prompt_len} were generated")
        if self._matcher is not None and n and hasattr(self._matcher, "rollback"):
            self._matcher.rollback(n)
        self._end_idx = new_end
        self._active_idx = min(self._active_idx, new_end)
        self._start_idx = min(self._start_idx, new_end - 1)
        self._committed_idx = min(self._committed_idx, self._start_idx)
        self._completion_end_idx = min(self._completion_end_idx, new_end)
        self._completion_start_idx = min(self._completion_start_idx, self._completion_end_idx)
        for position in [p for p in self._log_probabilities_data if p >= new_end]:
            del self._log_probabilities_data[position]
        if n and self._status.is_done:
            self._status = GenerationStatus.ACTIVE

    def reset(self) -> None:
        """After eviction: every token so far becomes the new prompt, to be encoded again.

        The cache slot is left to the runtime (it frees it when it evicts); min/max new
        tokens keep counting from the original prompt.
        """
        self._start_idx = 0
        self._active_idx = self._end_idx
        self._committed_idx = 0
        self._prompt_len = self._end_idx
        self._is_initial_prompt = True

    def compute_num_available_steps(self, max_seq_len: int) -> int:
        """Steps that fit before the KV cache holds ``max_seq_len`` tokens (MAX's formula:
        ``max_seq_len - (current_length - active_length)``)."""
        return _check_index("max_seq_len", max_seq_len) - (self.current_length - self.active_length)

    def get_min_token_logit_mask(self, num_steps: int) -> list[np.ndarray]:
        """Per step, ``[n, 2]`` int32 (row, token id) pairs to mask (set to -inf) in the logits.

        The stop ids are masked while the token being sampled would be one of the first
        ``min_tokens`` generated. The row is always 0: the caller substitutes the batch row.
        """
        ids = sorted(self.stop_token_ids)
        masked = np.array([(0, t) for t in ids], dtype=np.int32).reshape(-1, 2)
        empty = np.zeros((0, 2), dtype=np.int32)
        # The token sampled at step s lands at position active_idx + s; it is generated token
        # number (position - initial prompt length) counting from 0.
        first = self._active_idx - self._initial_prompt_len
        return [masked if 0 <= first + s < self.min_tokens else empty
                for s in range(_check_index("num_steps", num_steps))]

    # ---- outputs ------------------------------------------------------------------------------

    def outstanding_completion_tokens(self) -> list[tuple[int, LogProbabilities | None]]:
        """The generated tokens (with log-probabilities) not returned yet; returns each once."""
        out = [(int(self._tokens[i]), self._log_probabilities_data.pop(i, None))
               for i in range(self._completion_start_idx, self._completion_end_idx)]
        self._completion_start_idx = self._completion_end_idx
        return out

    def stop_token(self) -> tuple[int, LogProbabilities | None] | None:
        """The eos / stop token id that ended the sequence (it is never output), with its log-probability when
        they were asked for; None when something else ended it, or it has not ended."""
        if self._status is not GenerationStatus.END_OF_SEQUENCE or self._end_idx <= self._completion_end_idx:
            return None
        token = int(self._tokens[self._end_idx - 1])
        if token not in self.stop_token_ids:
            return None
        return token, self._log_probabilities_data.get(self._end_idx - 1)

    def to_generation_output(self) -> TextGenerationOutput:
        """The outstanding tokens as a ``TextGenerationOutput`` with the current status."""
        pairs = self.outstanding_completion_tokens()
        logprobs = [lp for _t, lp in pairs if lp is not None]
        return TextGenerationOutput(request_id=self._request_id, tokens=[t for t, _lp in pairs],
                                    final_status=self._status, log_probabilities=logprobs or None)

    @property
    def status(self) -> GenerationStatus:
        return self._status

    def update_status(self, status: GenerationStatus) -> None:
        if not isinstance(status, GenerationStatus):
            raise ValueError(f"status must be a GenerationStatus, got {status!r}")
        self._status = status

    @property
    def is_done(self) -> bool:
        return self._status.is_done

    # ---- cache slot -----------------------------------------------------------------------------

    def assign_to_cache(self, cache_seq_id: int) -> None:
        slot = _check_index("cache_seq_id", cache_seq_id)
        if slot < 0:
            raise ValueError(f"cache_seq_id must be >= 0, got {slot}")
        if self._cache_seq_id is not None:
            raise ValueError(f"request {self._request_id!r} already holds cache slot {self._cache_seq_id}")
        self._cache_seq_id = slot

    def unassign_from_cache(self) -> None:
        if self._cache_seq_id is None:
            raise ValueError(f"request {self._request_id!r} is not assigned to a cache slot")
        self._cache_seq_id = None

    @property
    def is_assigned_to_cache(self) -> bool:
        return self._cache_seq_id is not None

    @property
    def cache_seq_id(self) -> int:
        if self._cache_seq_id is None:
            raise ValueError(f"request {self._request_id!r} is not assigned to a cache slot")
        return self._cache_seq_id

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(request_id={self._request_id!r}, start_idx={self._start_idx}, "
                f"active_idx={self._active_idx}, end_idx={self._end_idx}, status={self._status.value})")


class AudioContext(TextContext):
    """A text-to-speech request: a TextContext over speech tokens plus decoded-audio state.

    ``audio_buffer`` holds audio decoded but not yet returned and ``decoded_index`` the
    number of generated speech tokens already turned into audio; the audio pipeline owns both.
    """

    def __init__(
        self,
        request_id: str,
        tokens: np.ndarray | list[int],
        *,
        audio_prompt_tokens: np.ndarray | list[int] | None = None,
        audio_prompt_transcription: str = "",
        buffer_speech_tokens: np.ndarray | None = None,
        streaming: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(request_id, tokens, **kwargs)
        self.audio_prompt_tokens = np.asarray(
            [] if audio_prompt_tokens is None else audio_prompt_tokens, dtype=np.int32)
        self.audio_prompt_transcription = audio_prompt_transcription
        self.buffer_speech_tokens = buffer_speech_tokens
        self.streaming = bool(streaming)
        self.audio_buffer: np.ndarray | None = None
        self.decoded_index = 0
