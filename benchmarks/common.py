"""What the benchmarks share: random prompts, median timing, decode rates of greedy generation, the raw read
of a model's files and the ``--json`` file. No JAX or maxjax import, so any benchmark, peer or child process
can use it cheaply."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """[batch, length] int32 random token ids (from 100 up: clear of the special tokens)."""
    return np.random.default_rng(seed).integers(100, vocab, size=(batch, length)).astype(np.int32)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    return alternating_medians({"fn": fn}, repeats)["fn"]


# Rounds of alternating calls behind a time-to-first-token figure, the noisiest one (at least this many).
TTFT_ROUNDS = 5


def alternating_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds, every round calling each once in turn (systems
    compared this way share any drift in the machine's speed)."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}


def decode_rate(batch: int, new_tokens: int, t_full: float, t_first: float) -> float:
    """Decode tokens/s without the prefill: ``B (N - 1) / (T(N tokens) - T(1 token))``."""
    return batch * (new_tokens - 1) / max(t_full - t_first, 1e-9)


def generation_rates(generate: Callable[[np.ndarray, int], object], prompts: np.ndarray, new_tokens: int,
                     repeats: int) -> dict[str, float]:
    """Greedy ``generate(prompts, n)`` timed to ``new_tokens`` and then to its first token alone (medians):
    end-to-end and decode tokens/s over all rows, and the seconds to the first token."""
    full = timed(lambda: generate(prompts, new_tokens), repeats)
    first = timed(lambda: generate(prompts, 1), repeats)
    batch = len(prompts)
    return {"e2e_tok_s": batch * new_tokens / full, "decode_tok_s": decode_rate(batch, new_tokens, full, first),
            "first_token_s": first}


def same_tokens(ours: dict[str, list[int]] | np.ndarray, theirs: np.ndarray) -> float:
    """The fraction of equal greedy tokens (``ours`` as maxjax's runners return them: {request: tokens}), so
    that a fast wrong answer cannot pass for a fast right one."""
    ours = np.array(list(ours.values())) if isinstance(ours, dict) else ours
    return float(np.mean(ours == theirs))


def raw_read_seconds(path: Path) -> float:
    """Seconds to read the model's bytes once (a file, or every file of a folder; 64 MiB reads): the floor for
    any load of it."""
    t0 = time.perf_counter()
    for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def quick_json_args(doc: str) -> argparse.Namespace:
    """The micro-benchmarks' command line: ``--quick`` (fewer, smaller runs) and ``--json FILE``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args()


def write_json(path: str | None, results) -> None:
    """``--json FILE``: the figures, indented (nothing without a path)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
