"""Per-request sampling parameters, validated once at construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """Request-specific sampling parameters that are only known at run time.

    The defaults are greedy decoding (``top_k=1``). Every field is checked in
    ``__post_init__``; a bad value raises ``ValueError`` naming the field, so a
    malformed request fails before it reaches the device.
    """

    top_k: int = 1
    top_p: float = 1
    min_p: float = 0.0
    temperature: float = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    detokenize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if _check_int("top_k", self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        top_p = _check_finite("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        min_p = _check_finite("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if _check_finite("temperature", self.temperature) < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_finite("frequency_penalty", self.frequency_penalty)
        _check_finite("presence_penalty", self.presence_penalty)
        if _check_finite("repetition_penalty", self.repetition_penalty) <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens is not None and _check_int("max_new_tokens", self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1 when set, got {self.max_new_tokens}")
        if _check_int("min_new_tokens", self.min_new_tokens) < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                             f"max_new_tokens ({self.max_new_tokens})")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.detokenize, bool):
            raise ValueError(f"detokenize must be a bool, got {self.detokenize!r}")
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {ids!r}")
        if _check_int("seed", self.seed) < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (a single string becomes a one-element list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
