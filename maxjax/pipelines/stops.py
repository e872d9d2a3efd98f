"""Stop strings: incremental detokenization of one request's generated tokens and the search for stops.

A stop string may span token boundaries, so a ``StopChecker`` keeps the generated text (decoded with the
tokenizer's ``stream_decoder``) and, after each token, searches the part of the text that a new stop could
end in. Only generated text is searched: the decoder is primed with the prompt's last tokens (so the
first generated token decodes with its real neighbour) and that priming text is discarded.

When several stop strings complete, the one that starts earliest wins; the visible text ends where it
starts. For streaming, ``safe_text`` holds back any suffix that is the beginning of a stop string, so a
client never sees characters that later turn out to belong to a stop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_PRIME_TOKENS = 4  # prompt tokens decoded before the first generated one (leading-space rules, merges)


class StopChecker:
    """The generated text of one request and where (if anywhere) a stop string begins in it.

    Args:
        stops: the stop strings (non-empty).
        decoder: an incremental decoder with ``push(ids) -> str`` and ``flush() -> str``
            (``BaseTokenizer.stream_decoder()``).
        prompt_tail: the last prompt tokens, decoded first and discarded.
    """

    def __init__(self, stops: Sequence[str], decoder: Any, prompt_tail: Iterable[int] = ()) -> None:
        stops = [s for s in stops if s]
        if not stops:
            raise ValueError("stop strings must be non-empty")
        self.stops = list(dict.fromkeys(stops))
        self._decoder = decoder
        self._longest = max(len(s) for s in self.stops)
        tail = [int(t) for t in prompt_tail][-_PRIME_TOKENS:]
        if tail:
            self._decoder.push(tail)  # the prompt's own text never counts
        self._text = ""
        self._stop_offset: int | None = None
        self._finished = False
        self._streamed = 0

    # -- feeding -------------------------------------------------------------------------------------
    def push(self, token_ids: int | Iterable[int]) -> bool:
        """Adds generated tokens; True when the text now contains a stop string (later pushes are ignored)."""
        if self.stopped or self._finished:
            return self.stopped
        self._append(self._decoder.push(token_ids))
        return self.stopped

    def finish(self) -> None:
        """The request ended without a stop: text held back by the decoder is released and searched."""
        if not self.stopped and not self._finished:
            self._append(self._decoder.flush())
        self._finished = True

    def _append(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self._text) - self._longest + 1)  # a new stop must end inside ``piece``
        self._text += piece
        hits = [i for i in (self._text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self._stop_offset = min(hits)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._stop_offset is not None

    @property
    def stop_text_offset(self) -> int | None:
        """Index in the generated text where the stop string begins (None while no stop was seen)."""
        return self._stop_offset

    @property
    def text(self) -> str:
        """Everything decoded so far, a stop string (and text after it) included."""
        return self._text

    @property
    def visible_text(self) -> str:
        """The generated text a client gets: everything before the stop string."""
        return self._text if self._stop_offset is None else self._text[: self._stop_offset]

    def safe_text(self) -> str:
        """The longest prefix of the visible text that no future token can turn into part of a stop string."""
        if self.stopped or self._finished:
            return self.visible_text
        return self._text[: len(self._text) - self._held_back()]

    def take_new_text(self) -> str:
        """The part of ``safe_text()`` not returned by an earlier call (for streaming)."""
        safe = self.safe_text()
        piece = safe[self._streamed:]
        self._streamed = max(self._streamed, len(safe))
        return piece

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        text = self._text
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self.stops):
                return n
        return 0
