"""The TokenGenerator: the host loop between TextContexts and the engine's compiled programs.

One ``next_token`` call: check every context (nothing changes if one is bad), give new requests a KV cache
slot, prefill whatever prompt is not yet in the cache (in chunks of at most ``max_prefill_len``), then
decode every live row for up to ``num_steps`` tokens in one device call, and copy the results to the host
once. Requests may join and leave between calls (continuous batching).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from maxjax.context import TextContext
from maxjax.interfaces import GenerationStatus, LogProbabilities, TextGenerationInputs, TextGenerationOutput
from maxjax.pipelines.rows import check_context, decode_budget, fill_sampling_row
from maxjax.runtime.config import bucket_for
from maxjax.runtime.engine import Engine, empty_decode_rows, empty_prefill_rows, empty_sampling
from maxjax.runtime.slots import SlotAllocator


def _log_probabilities(token_lp: float, top_ids: np.ndarray, top_values: np.ndarray, n: int) -> LogProbabilities:
    return LogProbabilities(token_log_probabilities=[float(token_lp)],
                            top_log_probabilities=[{int(i): float(v) for i, v in zip(top_ids[:n], top_values[:n])}])


class TextGenerationPipeline:
    """Implements ``TokenGenerator`` over an ``Engine``.

    ``tokenizer`` (optional) is kept for callers that need it next to the pipeline (stop strings,
    structured output); the token loop itself never detokenizes.
    """

    def __init__(self, engine: Engine, tokenizer: Any = None, model_name: str = ""):
        self.engine = engine
        self.config = engine.config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.slots = SlotAllocator(self.config.max_batch_size)
        self._contexts: dict[str, TextContext] = {}

    def warmup(self) -> int:
        """Compiles every program the bucket policy can ask for; returns the number of programs."""
        return self.engine.warmup()

    # -- TokenGenerator ------------------------------------------------------------------------------
    def next_token(self, inputs: TextGenerationInputs) -> dict[str, TextGenerationOutput]:
        num_steps = inputs.num_steps
        if not 1 <= num_steps <= self.config.max_num_steps:
            raise ValueError(f"num_steps must be in [1, {self.config.max_num_steps}] (the runtime's max_num_steps), "
                             f"got {num_steps}")
        batch = inputs.batch
        for request_id, ctx in batch.items():
            check_context(request_id, ctx, self.config, self.engine.vocab_size)
        live = {rid: ctx for rid, ctx in batch.items() if not ctx.is_done}
        self._assign_slots(live)
        prefilled = self._prefill([ctx for ctx in live.values() if ctx.is_ce])
        self._decode([ctx for ctx in live.values() if not ctx.is_done], num_steps, prefilled)
        return {rid: ctx.to_generation_output() for rid, ctx in batch.items()}

    def release(self, request_id: str) -> None:
        """Frees the request's KV cache slot. Unknown ids raise ValueError."""
        self.slots.release(request_id)
        ctx = self._contexts.pop(request_id)
        if ctx.is_assigned_to_cache:
            ctx.unassign_from_cache()

    # -- slots -----------------------------------------------------------------------------------------
    def _assign_slots(self, live: dict[str, TextContext]) -> None:
        new = []
        for rid, ctx in live.items():
            slot = self.slots.slot_of(rid)
            if slot is None:
                if not ctx.is_ce:
                    raise ValueError(f"request {rid!r} has no KV cache slot and nothing left to encode: "
                                     "call reset() on a context that was released or evicted")
                new.append(rid)
            elif not ctx.is_assigned_to_cache or ctx.cache_seq_id != slot or self._contexts[rid] is not ctx:
                raise ValueError(f"request {rid!r} holds slot {slot} with another context: release it first")
        if len(new) > self.slots.num_free:
            raise ValueError(f"{len(new)} new requests but only {self.slots.num_free} free KV cache slots "
                             f"(max_batch_size={self.config.max_batch_size}); release finished requests first")
        for rid in new:
            ctx = live[rid]
            if ctx.is_assigned_to_cache:
                ctx.unassign_from_cache()
            ctx.assign_to_cache(self.slots.assign(rid))
            self._contexts[rid] = ctx

    # -- prefill ---------------------------------------------------------------------------------------
    def _prefill(self, pending: list[TextContext]) -> set[str]:
        """Encodes the prompts of ``pending`` chunk by chunk; returns the ids that sampled their first token."""
        cfg = self.config
        group_size = cfg.prefill_batch_buckets[-1]
        sampled: set[str] = set()
        while pending:
            group, pending = pending[:group_size], pending[group_size:]
            chunks = [min(ctx.active_length, cfg.max_prefill_len) for ctx in group]
            num_rows = bucket_for(len(group), cfg.prefill_batch_buckets, "prefill batch")
            length = bucket_for(max(chunks), cfg.prefill_lengths, "prefill chunk length")
            kv_len = bucket_for(max(c.start_idx + n for c, n in zip(group, chunks)), cfg.length_buckets,
                                "sequence length")
            rows = empty_prefill_rows(num_rows, length)
            sampling = empty_sampling(num_rows, self.engine.vocab_size, cfg.max_stop_ids)
            for r, (ctx, n) in enumerate(zip(group, chunks)):
                self._pack_prefill_row(rows, sampling, r, ctx, n)
            first, first_lp, echo_lp = self.engine.prefill(rows, sampling, kv_len)
            first = np.asarray(first)
            first_lp = first_lp if rows["logprobs"].any() else None
            for r, (ctx, n) in enumerate(zip(group, chunks)):
                if n < ctx.active_length:  # more prompt to come: move the window, keep the context pending
                    ctx.bump_token_indices(start_idx=n)
                    pending.append(ctx)
                    continue
                lp = None
                if first_lp is not None and ctx.log_probabilities:
                    token_lp, top_ids, top_values = (np.asarray(a[r]) for a in
                                                     (first_lp.token, first_lp.top_ids, first_lp.top_values))
                    lp = _log_probabilities(token_lp, top_ids, top_values, ctx.log_probabilities)
                ctx.update(int(first[r]), lp)
                sampled.add(ctx.request_id)
        return sampled

    def _pack_prefill_row(self, rows, sampling, r: int, ctx: TextContext, n: int) -> None:
        start = ctx.start_idx
        rows["tokens"][r, :n] = ctx.next_tokens[:n]
        rows["positions"][r, :n] = np.arange(start, start + n)
        rows["slots"][r] = ctx.cache_seq_id
        rows["last_index"][r] = n - 1
        rows["samples"][r] = n == ctx.active_length
        rows["num_generated"][r] = ctx.num_generated
        rows["logprobs"][r] = ctx.log_probabilities > 0
        fill_sampling_row(sampling, r, ctx, self.engine.vocab_size)

    # -- decode ----------------------------------------------------------------------------------------
    def _decode(self, live: list[TextContext], num_steps: int, prefilled: set[str]) -> None:
        budgets = [decode_budget(ctx, num_steps - (ctx.request_id in prefilled)) for ctx in live]
        work = [(ctx, b) for ctx, b in zip(live, budgets) if b > 0]
        if not work:
            return
        cfg = self.config
        num_rows = bucket_for(len(work), cfg.batch_buckets, "decode batch")
        kv_len = bucket_for(max(ctx.end_idx - 1 + b for ctx, b in work), cfg.length_buckets, "sequence length")
        rows = empty_decode_rows(num_rows)
        sampling = empty_sampling(num_rows, self.engine.vocab_size, cfg.max_stop_ids)
        for r, (ctx, budget) in enumerate(work):
            rows["tokens"][r] = ctx.all_tokens[-1]
            rows["positions"][r] = ctx.end_idx - 1
            rows["slots"][r] = ctx.cache_seq_id
            rows["steps"][r] = budget
            rows["num_generated"][r] = ctx.num_generated
            rows["logprobs"][r] = ctx.log_probabilities > 0
            fill_sampling_row(sampling, r, ctx, self.engine.vocab_size)
        tokens, lp = self.engine.decode(rows, sampling, kv_len)
        tokens = np.asarray(tokens)  # [N, B]: the one device -> host copy on the plain path
        lp = tuple(np.asarray(a) for a in (lp.token, lp.top_ids, lp.top_values)) if rows["logprobs"].any() else None
        for r, (ctx, budget) in enumerate(work):
            for s in range(budget):
                token = int(tokens[s, r])
                if token < 0:
                    break
                row_lp = None
                if lp is not None and ctx.log_probabilities:
                    row_lp = _log_probabilities(lp[0][s, r], lp[1][s, r], lp[2][s, r], ctx.log_probabilities)
                ctx.update(token, row_lp)
                if ctx.is_done:
                    break
