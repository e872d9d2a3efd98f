"""Per-request sampling parameters, validated once at construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
MIN_TEMPERATURE = 1e-6
"""Positive temperatures below this divide logits into float32 overflow (inf - inf = NaN); 0 means greedy."""
PENALTY_LIMIT = 1e6
"""Bound on |frequency_penalty|, |presence_penalty| and on repetition_penalty and its inverse: beyond it a
penalty removes a token outright already, and the penalised logits stay finite in float32 for any count."""


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, upper: int = INT32_MAX) -> int:
    """An int within ``upper`` (default: the int32 range the device arrays hold, so nothing overflows later)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value > upper:
        raise ValueError(f"{name} must be <= {upper}, got {value!r}")
    return int(value)


def _check_float32(name: str, value: object) -> float:
    """A finite number that stays finite as a float32 on the device."""
    value = _check_finite(name, value)
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must fit a float32 (|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Request-specific sampling parameters that are only known at run time.

    The defaults are greedy decoding (``top_k=1``). Every field is checked in
    ``__post_init__``; a bad value raises ``ValueError`` naming the field, so a
    malformed request fails before it reaches the device: integers must fit the
    device's int32 (``seed``: uint32), floats must be finite float32 values within
    the ranges above (``MIN_TEMPERATURE``, ``PENALTY_LIMIT``).
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
        top_p = _check_float32("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        min_p = _check_float32("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        temperature = _check_float32("temperature", self.temperature)
        if temperature < 0.0 or 0.0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        for name in ("frequency_penalty", "presence_penalty"):
            if abs(_check_float32(name, getattr(self, name))) > PENALTY_LIMIT:
                raise ValueError(f"{name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {getattr(self, name)}")
        if not 1 / PENALTY_LIMIT <= _check_float32("repetition_penalty", self.repetition_penalty) <= PENALTY_LIMIT:
            raise ValueError(f"repetition_penalty must be in [{1 / PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], "
                             f"got {self.repetition_penalty}")
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
                    isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in ids):
                raise ValueError(f"stop_token_ids must be a list of ints in [0, 2**31), got {ids!r}")
        if _check_int("seed", self.seed, upper=UINT32_MAX) < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (a single string becomes a one-element list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
