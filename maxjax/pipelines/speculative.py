"""The host loop of speculative decoding: draft, verify in one device call, apply the accepted tokens.

Each of a ``next_token`` call's ``num_steps`` rounds gives every row 1 to K + 1 tokens: the drafter
proposes up to K tokens, the verify program (``maxjax.runtime.verify``) scores them with the target model
and accepts a prefix on the device, and the host appends the accepted tokens with ``ctx.update``, through
the same checks as plain decode (eos and stop ids, stop strings, max_new_tokens, max_length, logprobs).
Drafts never enter the context, so nothing is rolled back on the host, and rejected positions' K/V are
overwritten by later passes.

Drafting is per row and adaptive: a row drafts at most as many tokens as it may still generate minus one;
rows with a grammar (``json_schema``) never draft (their bitmask is exact only for the first position); and a
row whose accepted drafts per round (an exponential moving average) fall below ``MIN_ACCEPTED`` stops
drafting for ``PAUSE_TOKENS`` tokens. A round in which no row drafts runs the plain multi-step decode program
instead (far cheaper per token than one verify call per token): for the rest of the call when every row
stopped drafting, for ``NO_DRAFT_STEPS`` steps when a drafter merely found nothing this time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxjax.context import TextContext
from maxjax.pipelines.drafters import DraftModelDrafter, NgramDrafter
from maxjax.pipelines.rows import decode_budget
from maxjax.pipelines.text import host_logprobs
from maxjax.runtime.config import bucket_for
from maxjax.runtime.engine import Engine, empty_sampling, empty_verify_rows

# A verify call of SmolLM2 at batch 1 costs about 1.65 decode steps on a 2-core CPU (benchmarks/
# bench_speculative.py reports the break-even): drafting pays above ~0.65 accepted drafts per verify round.
MIN_ACCEPTED = 0.7  # accepted drafts per verify round below which a row stops drafting
PAUSE_TOKENS = 64  # how long a row that stopped paying decodes plainly before it drafts again
EMA_WEIGHT = 0.3  # weight of the latest round in the acceptance average
NO_DRAFT_STEPS = 4  # plain decode steps before a row whose drafter found nothing asks again
START_ACCEPTED = 2.0  # the average a row starts (and resumes) with: three fruitless rounds pause it


def make_drafter(config: Any, draft_engine: Engine | None) -> Any:
    """The drafter ``config.speculative`` names; ValueError when a draft model is missing or unusable."""
    if config.speculative is None:
        raise ValueError("draft_model needs speculative='draft'")
    if config.speculative == "ngram":
        if draft_engine is not None:
            raise ValueError("draft_model is only used with speculative='draft', got speculative='ngram'")
        return NgramDrafter()
    if draft_engine is None:
        raise ValueError("speculative='draft' needs a draft model (draft_model)")
    return DraftModelDrafter(draft_engine)


class SpeculativeDecoding:
    """Speculative decode rounds for one ``TextGenerationPipeline`` (which owns contexts and slots)."""

    def __init__(self, pipeline: Any, drafter: Any):
        self.pipeline, self.drafter = pipeline, drafter
        self.engine = pipeline.engine
        self.k = pipeline.config.num_speculative_tokens
        self._accepted: dict[str, float] = {}  # request id -> EMA of accepted drafts per verify round
        self._resume_at: dict[str, int] = {}  # request id -> num_generated at which a paused row drafts again
        self.stats = {"rounds": 0, "drafted": 0, "accepted": 0}  # totals over drafting rows (for benchmarks)

    def release(self, request_id: str) -> None:
        self.drafter.release(request_id)
        self._accepted.pop(request_id, None)
        self._resume_at.pop(request_id, None)

    def decode(self, work: list[tuple[TextContext, int]]) -> None:
        """Up to ``rounds`` speculative rounds for each (context, rounds) of ``work``."""
        rounds = {ctx.request_id: n for ctx, n in work}
        while True:
            live = [ctx for ctx, _ in work
                    if rounds[ctx.request_id] > 0 and not ctx.is_done and decode_budget(ctx, 1) > 0]
            if not live:
                return
            wanted = [(ctx, self._num_drafts(ctx)) for ctx in live]
            asked = [(ctx, k) for ctx, k in wanted if k > 0]
            drafts = dict(zip([ctx.request_id for ctx, _ in asked], self.drafter.propose(asked)))
            steps = 1
            if any(d.size for d in drafts.values()):
                self._verify(live, drafts)
            else:  # nothing to verify: plain multi-step decode, briefly if some row may find a draft soon
                steps = max(rounds[ctx.request_id] for ctx in live)
                if asked:
                    steps = min(steps, NO_DRAFT_STEPS)
                self.pipeline.decode_work([(ctx, decode_budget(ctx, min(steps, rounds[ctx.request_id])))
                                            for ctx in live])
            for ctx in live:
                rounds[ctx.request_id] -= steps

    def _num_drafts(self, ctx: TextContext) -> int:
        if ctx.matcher is not None or ctx.num_generated < self._resume_at.get(ctx.request_id, 0):
            return 0
        # Every draft plus the token after the accepted ones must fit in max_new_tokens / max_length.
        return max(0, min(self.k, decode_budget(ctx, self.k + 1) - 1))

    def _verify(self, live: list[TextContext], drafts: dict[str, np.ndarray]) -> None:
        cfg = self.pipeline.config
        num_rows = bucket_for(len(live), cfg.batch_buckets, "decode batch")
        counts = [drafts.get(ctx.request_id, np.zeros(0, np.int32)).size for ctx in live]
        kv_len = bucket_for(max(ctx.end_idx + n for ctx, n in zip(live, counts)), cfg.length_buckets,
                            "sequence length")
        rows = empty_verify_rows(num_rows, self.k + 1, cfg.pages_per_row(kv_len))
        sampling = empty_sampling(num_rows, self.engine.vocab_size, cfg.max_stop_ids)
        for r, (ctx, n) in enumerate(zip(live, counts)):
            rows["tokens"][r, 0] = ctx.all_tokens[-1]
            rows["tokens"][r, 1:1 + n] = drafts[ctx.request_id] if n else []
            rows["start"][r] = ctx.end_idx - 1
            rows["num_drafts"][r] = n
            rows["active"][r] = True
            self.pipeline.pack_generating_row(rows, sampling, r, ctx, ctx.end_idx + n)
        tokens, lp = self.engine.verify(rows, sampling, kv_len)
        tokens = np.asarray(tokens)  # [B, K + 1]
        # host arrays laid out [K + 1, B, ...] as decode's
        lp = tuple(np.swapaxes(a, 0, 1) for a in host_logprobs(lp)) if rows["logprobs"].any() else None
        self.pipeline.apply_tokens(live, tokens.T, lp)
        for r, (ctx, n) in enumerate(zip(live, counts)):
            if n:
                self._record(ctx, n, int((tokens[r] >= 0).sum()) - 1)

    def _record(self, ctx: TextContext, drafted: int, accepted: int) -> None:
        """Updates the row's acceptance average; pauses its drafting when drafting stopped paying."""
        self.stats["rounds"] += 1
        self.stats["drafted"] += drafted
        self.stats["accepted"] += accepted
        rid = ctx.request_id
        average = (1 - EMA_WEIGHT) * self._accepted.get(rid, START_ACCEPTED) + EMA_WEIGHT * accepted
        self._accepted[rid] = average
        if average < MIN_ACCEPTED:
            self._resume_at[rid] = ctx.num_generated + PAUSE_TOKENS
            self._accepted[rid] = START_ACCEPTED  # a fresh start when it resumes
