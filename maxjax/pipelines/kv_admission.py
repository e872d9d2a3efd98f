"""Requests' KV cache pages, seen from the host loop: admission with prefix hits, growth before each device call,
and the check that a call has the pages it needs before anything changes.

Why a check first: a ``next_token`` call that ran out of pages half-way would leave some requests a token ahead
of others. So the call first counts the pages every row may need (its prompt, then ``num_steps`` tokens, or
``num_steps`` verify rounds of K + 1), and raises ``KVCacheFull`` (a ValueError) naming the shortage when the pool
cannot give them; the server's scheduler and ``LLM`` then wait or preempt a request, direct callers see the error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxjax.context import TextContext
from maxjax.pipelines.rows import wants_echo
from maxjax.runtime.kv_pages import KVCacheFull, PageTable


def _salt(ctx: TextContext) -> str:
    """What besides the tokens changes a page's K/V: the LoRA adapter."""
    return ctx.lora_name or ""


class RequestPages:
    """The pages of one pipeline's requests (a ``PageTable`` over its engine's pool)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.config = engine.config
        self.table = PageTable(engine.pool)
        self.pool = engine.pool
        self.page_size = self.table.page_size
        self.preemptions = 0  # requests set aside to make room (``set_aside``)

    def holds(self, request_id: str) -> bool:
        return self.table.holds(request_id)

    def _uses_cache(self, ctx: TextContext) -> bool:
        """Whether a joining request may start from cached pages: not with echo (its prompt's log-probabilities
        are computed, so outputs with and without the cache are the same), nor part-way through its prompt."""
        return self.pool.prefix_caching and not wants_echo(ctx) and not ctx.start_idx

    def _cached(self, ctx: TextContext) -> list[int]:
        """The cached pages a joining request would share."""
        return self.table.cached_prefix(ctx.all_tokens, _salt(ctx)) if self._uses_cache(ctx) else []

    def check(self, live: dict[str, TextContext], tokens_per_call: int) -> None:
        """Raises before anything changes when the call could need more pages than the pool can give:
        ValueError for a prompt longer than the whole pool, ``KVCacheFull`` when pages are only short now."""
        needed, shared = 0, set()
        for rid, ctx in live.items():
            total = min(ctx.current_length + tokens_per_call, self.config.max_seq_len)
            if not self.table.holds(rid):
                if self.table.pages_for(ctx.current_length) > self.pool.num_pages:
                    raise ValueError(f"request {rid!r}: its {ctx.current_length} tokens need "
                                     f"{self.table.pages_for(ctx.current_length)} KV cache pages, more than the "
                                     f"whole pool ({self.pool.num_pages} pages of {self.page_size}; see "
                                     "RuntimeConfig.num_pages / kv_cache_memory)")
                hits = self._cached(ctx)
                shared.update(page for page in hits if self.pool.is_idle(page))
                needed += max(0, self.table.pages_for(total) - len(hits))
            else:
                needed += self.table.new_pages_needed(rid, total)
        available = self.pool.num_available - len(shared)
        if needed > available:
            raise KVCacheFull(f"this call may need {needed} more KV cache pages but {available} are available "
                              f"({self.pool.num_pages} pages of {self.page_size} positions; release or preempt "
                              "requests, or load with more num_pages / kv_cache_memory)")

    def leaders_first(self, joining: list[TextContext]) -> tuple[list[TextContext], list[TextContext]]:
        """Joining requests split into those to prefill now and those whose next uncached page another joining
        request is about to compute: they join after it, and share its pages instead of computing them too."""
        now, later, computing = [], [], set()
        for ctx in joining:
            if not self._uses_cache(ctx):
                now.append(ctx)
                continue
            keys = self.table.prefix_keys(ctx.all_tokens, _salt(ctx))
            hits = len(self.pool.lookup(keys))
            if hits < len(keys) and keys[hits] in computing:
                later.append(ctx)
            else:
                now.append(ctx)
                computing.update(keys[hits:])
        return now, later

    def admit(self, ctx: TextContext) -> None:
        """Gives a joining request its cached prefix (copying a kept partial page's positions into a page of its
        own); its prompt then starts after it."""
        cached, copy = self.table.admit(ctx.request_id, ctx.all_tokens, _salt(ctx), self._uses_cache(ctx))
        if copy is not None:
            self.engine.copy_page(*copy)
        if cached:
            ctx.bump_token_indices(start_idx=cached)

    def fill(self, rows: dict[str, np.ndarray], r: int, ctx: TextContext, num_tokens: int) -> None:
        """Row ``r``'s block table, after growing the request's pages to ``num_tokens`` positions."""
        self.table.reserve(ctx.request_id, num_tokens)
        rows["pages"][r] = self.table.row(ctx.request_id, rows["pages"].shape[1])

    def commit(self, ctx: TextContext) -> None:
        """Enters the request's newly filled pages in the prefix cache (every token before ``start_idx`` has its
        K/V written)."""
        if self.table.holds(ctx.request_id):
            self.table.commit(ctx.request_id, ctx.all_tokens[:ctx.start_idx])

    def release(self, request_id: str, ctx: TextContext | None = None) -> None:
        """Gives back the request's pages; with its context, its last partly filled page is kept for a
        continuation of its tokens (the next turn of a chat)."""
        if self.table.holds(request_id):
            written = None if ctx is None else ctx.all_tokens[:ctx.start_idx]
            self.table.release(request_id, written)

    def stats(self) -> dict[str, float]:
        """Pages used / free / cached and the prefix cache's hit rate (prompt tokens served from it)."""
        pool = self.pool
        return {"kv_pages_total": pool.num_pages, "kv_pages_used": pool.num_used,
                "kv_pages_free": pool.num_available, "kv_pages_cached": pool.num_cached,
                "prefix_cache_hit_rate": pool.hit_tokens / pool.queried_tokens if pool.queried_tokens else 0.0,
                "preemptions": self.preemptions}


def set_aside(pipeline: Any, active: dict[str, TextContext]) -> str:
    """After ``KVCacheFull``: the request of ``active`` (in admission order) to take out of the batch. The newest
    one that holds no pages yet simply waits; otherwise the newest running one is preempted: its pages are
    released (its full pages stay in the prefix cache) and its tokens so far become a prompt to encode again
    when it comes back, so its output continues where it stopped. Returns its id; the caller re-queues it first.
    A batch of one cannot make room: ``KVCacheFull`` again (the pool is smaller than that request)."""
    if len(active) < 2:
        raise KVCacheFull(f"request {next(iter(active), None)!r} alone needs more KV cache pages than the pool "
                          f"has ({pipeline.engine.pool.num_pages}); load with more num_pages / kv_cache_memory")
    waiting = [rid for rid in active if not pipeline.pages.holds(rid)]
    rid = waiting[-1] if waiting else list(active)[-1]
    if pipeline.pages.holds(rid):
        pipeline.release(rid)
        active[rid].reset()
        pipeline.pages.preemptions += 1
    return rid
