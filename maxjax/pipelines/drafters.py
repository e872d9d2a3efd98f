"""Drafters for speculative decoding: they propose up to k next tokens per request, cheaply.

Both are deterministic (the draft distribution is a point mass), which is what the verify program's
rejection rule assumes (``maxjax.runtime.verify``). A drafter's ``propose`` takes ``[(context, k)]`` and
returns one int32 array of at most k tokens per row (empty: no proposal); ``release`` forgets a request.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from maxjax.context import TextContext
from maxjax.runtime.config import bucket_for
from maxjax.runtime.engine import Engine, empty_decode_rows, empty_prefill_rows, empty_sampling, place_prefill_row
from maxjax.runtime.kv_pages import PageTable


def ngram_draft(tokens: np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 2) -> np.ndarray:
    """Prompt lookup: the k tokens that followed the most recent earlier occurrence of the sequence's last n
    tokens, trying the longest n first (empty when nothing matches)."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if tokens.size <= n:
            continue
        windows = sliding_window_view(tokens[:-1], n)  # [L - n, n]: every n-gram with a token after it
        matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if matches.size:
            start = matches[-1] + n
            return tokens[start:start + k].astype(np.int32)
    return np.zeros(0, np.int32)


class NgramDrafter:
    """Proposes continuations of repeated n-grams from the request's own tokens (prompt and output): free to
    run, and right often where the output copies its input (editing, summarising, code, RAG). A single
    repeated token is no evidence (in free text it is mostly a common word): matches start at two tokens."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, work: list[tuple[TextContext, int]]) -> list[np.ndarray]:
        return [ngram_draft(ctx.all_tokens, k, self.max_ngram, self.min_ngram) for ctx, k in work]

    def release(self, request_id: str) -> None:
        pass

    def warmup(self) -> int:
        return 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class DraftModelDrafter:
    """A smaller model with the same vocabulary drafts greedily with its own ``Engine`` (params, KV cache
    slots, programs).

    Per request it remembers which tokens its cache holds: after a verify step the common prefix with the
    request's tokens stays, and only the tokens after it are fed again (a prefill of the catch-up window when
    it is longer than one token, e.g. after all drafts were accepted), then its decode program drafts.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.config = engine.config
        self.pages = PageTable(engine.pool)  # the draft model's KV cache pages (no prefix sharing)
        self._cached: dict[str, np.ndarray] = {}  # request id -> the tokens whose K/V the draft cache holds

    def warmup(self) -> int:
        return self.engine.warmup()

    def release(self, request_id: str) -> None:
        if self.pages.holds(request_id):
            self.pages.release(request_id)
        self._cached.pop(request_id, None)

    def propose(self, work: list[tuple[TextContext, int]]) -> list[np.ndarray]:
        """Drafts for each (context, k) of ``work``; rows the draft model's KV cache has no pages for get none
        (drafting is optional: they decode plainly this round)."""
        fits, room = [], self.pages.pool.num_available
        for ctx, k in work:
            needed = self.pages.new_pages_needed(ctx.request_id, ctx.current_length + k)
            fits.append(needed <= room)
            room -= needed if fits[-1] else 0
        drafts = iter(self._propose([item for item, fit in zip(work, fits) if fit]))
        return [next(drafts) if fit else np.zeros(0, np.int32) for fit in fits]

    def _propose(self, work: list[tuple[TextContext, int]]) -> list[np.ndarray]:
        rows = []  # (context, k, tokens, tokens already in the cache)
        for ctx, k in work:
            if not self.pages.holds(ctx.request_id):
                self.pages.admit(ctx.request_id, np.zeros(0, np.int32), use_cache=False)
                self._cached[ctx.request_id] = np.zeros(0, np.int32)
            tokens = ctx.all_tokens
            cached = min(_common_prefix(self._cached[ctx.request_id], tokens), tokens.size - 1)
            rows.append((ctx, k, tokens, cached))
        first = self._catch_up([row for row in rows if row[2].size - row[3] > 1])
        drafts = self._decode(rows, first)
        for (ctx, k, tokens, _), draft in zip(rows, drafts):
            self._cached[ctx.request_id] = np.concatenate([tokens, draft[:k - 1]])
        return drafts

    def _catch_up(self, rows: list) -> dict[str, int]:
        """Prefills each row's uncached tokens (in chunks); returns the first draft token of each row."""
        cfg = self.config
        first = {}
        for ctx, _, tokens, cached in rows:
            while cached < tokens.size:
                n = min(tokens.size - cached, cfg.max_prefill_len)
                length, kv_len = cfg.prefill_shape(n, cached + n)
                prefill = empty_prefill_rows(cfg.prefill_batch_buckets[0], length, cfg.pages_per_row(kv_len))
                place_prefill_row(prefill, 0, tokens[cached:cached + n], cached)
                self.pages.reserve(ctx.request_id, cached + n)
                prefill["pages"][0] = self.pages.row(ctx.request_id, prefill["pages"].shape[1])
                prefill["samples"][0] = cached + n == tokens.size
                sampling = empty_sampling(prefill["tokens"].shape[0], self.engine.vocab_size, cfg.max_stop_ids)
                token, _, _ = self.engine.prefill(prefill, sampling, kv_len)
                cached += n
            first[ctx.request_id] = int(np.asarray(token)[0])
        return first

    def _decode(self, rows: list, first: dict[str, int]) -> list[np.ndarray]:
        """Greedy drafts: k decode steps from the last token, or k - 1 after a caught-up row's first draft."""
        cfg = self.config
        num_rows = bucket_for(len(rows), cfg.batch_buckets, "draft batch")
        kv_len = bucket_for(max((tokens.size + k for _, k, tokens, _ in rows), default=1), cfg.length_buckets,
                            "sequence length")
        decode = empty_decode_rows(num_rows, cfg.pages_per_row(kv_len))
        for r, (ctx, k, tokens, _) in enumerate(rows):
            caught_up = ctx.request_id in first
            decode["tokens"][r] = first[ctx.request_id] if caught_up else tokens[-1]
            decode["positions"][r] = tokens.size - (0 if caught_up else 1)
            decode["slots"][r] = r  # greedy drafts: the generated-token counts are never read
            decode["steps"][r] = k - caught_up
            self.pages.reserve(ctx.request_id, decode["positions"][r] + decode["steps"][r])
            decode["pages"][r] = self.pages.row(ctx.request_id, decode["pages"].shape[1])
        out = None
        if decode["steps"].any():
            sampling = empty_sampling(num_rows, self.engine.vocab_size, cfg.max_stop_ids)
            out, _ = self.engine.decode(decode, sampling, kv_len)
            out = np.asarray(out)  # [N, B]
        drafts = []
        for r, (ctx, k, _, _) in enumerate(rows):
            head = [first[ctx.request_id]] if ctx.request_id in first else []
            tail = [] if out is None else list(out[:decode["steps"][r], r])
            drafts.append(np.array(head + tail, np.int32))
        return drafts
