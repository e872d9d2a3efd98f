"""Incremental detokenization with the prefix-offset / read-offset technique.

Decoding token by token cannot decode each token alone: a character may span several
tokens (byte-level BPE, SentencePiece byte fallback) and some decoders change a token's
text depending on its neighbours (leading-space stripping). So the decoder re-decodes a
short window: ``ids[prefix:read]`` was already emitted, ``ids[prefix:]`` is the new
decode; the difference is emitted only when it does not end in U+FFFD (an incomplete
UTF-8 sequence), otherwise it is held until more tokens arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turns a stream of token ids into text pieces whose concatenation equals a full decode."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add tokens; return the new text that is complete so far (may be empty)."""
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        self._ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Return whatever is held back (an incomplete sequence decodes to U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]
