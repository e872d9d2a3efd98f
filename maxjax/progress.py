"""Progress: one ``[maxjax] ...`` line per loading phase on stderr, as HF's and vLLM's loaders report theirs, and a
bar over many requests.

Lines go through the ``maxjax`` logger at INFO. ``show_progress`` gives that logger a stderr handler unless the
application configured logging itself (then its handlers print them); ``progress=False`` on an entry point
skips both, so nothing is printed unless the application asked for INFO logs.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("maxjax")


def show_progress() -> None:
    """maxjax's INFO log lines (load phases, compile or load from the compile cache) on stderr."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[maxjax] %(message)s"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


class Phases:
    """Reports the phases of one load when ``enabled``: ``phases("reading %s", path)``; ``elapsed()`` is the time
    since the load began."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self.start = time.perf_counter()
        if self.enabled:
            show_progress()

    def __call__(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def compile_counts() -> tuple[int, int]:
    """(programs compiled so far, of which loaded from the persistent compile cache) in this process."""
    from maxjax.runtime.compile_cache import cache_hit_count, compile_count

    return compile_count(), cache_hit_count()


def programs_note(before: tuple[int, int]) -> str:
    """What happened to programs since ``before`` (a ``compile_counts()``): compiled, loaded from the cache."""
    compiled, hits = compile_counts()
    hits -= before[1]
    fresh = compiled - before[0] - hits
    return f"{fresh + hits} programs ({fresh} compiled, {hits} loaded from the compile cache)"


class RequestBar:
    """``update(num_tokens)`` once per finished request; ``enabled=False`` shows nothing."""

    def __init__(self, total: int | None, enabled: bool = True, desc: str = "generating"):
        from tqdm.auto import tqdm

        self.tokens = 0
        self.bar = tqdm(total=total, desc=desc, unit="req", disable=not enabled, file=sys.stderr)

    def update(self, num_tokens: int = 0) -> None:
        self.tokens += num_tokens
        elapsed = self.bar.format_dict["elapsed"]
        if self.tokens and elapsed > 0:
            self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
