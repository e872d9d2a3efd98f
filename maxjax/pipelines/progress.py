"""A progress bar over requests (tqdm on stderr) that also shows the generated tokens per second."""

from __future__ import annotations

import sys


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
