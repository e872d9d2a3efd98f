"""The TokenGenerator: the host loop between TextContexts and the engine's compiled programs.

One ``next_token`` call: check every context and that the KV cache has the pages the call may need (nothing
changes if not), build grammar matchers and stop-string checkers for new requests, give new requests a slot
and their cached prefix's pages (``pipelines/kv_admission.py``), prefill whatever prompt is not yet in the
cache (in chunks of at most ``max_prefill_len``, pages taken as they fill), then decode every live row for up to
``num_steps`` tokens, and copy the results to the host once per device call. Requests may join and leave
between calls (continuous batching).

Generation features (all are data to the compiled programs: none compiles anything after warm-up):

* **Log-probabilities** (``logprobs=N``): per generated token a ``LogProbabilities([lp], [{id: lp} top-N])``
  from the model's log-softmax, before penalties, temperature and the grammar mask (as MAX and OpenAI).
* **Echo** (``echo=True`` with ``logprobs > 0``): the prompt tokens' log-probabilities, computed during
  prefill (chunked prefill included). They come first in the request's first output: its
  ``log_probabilities`` holds ``len(prompt) - 1`` entries for prompt tokens 1.. (the first prompt token has
  no log-probability), then one entry per generated token.
* **Stop strings** (``ctx.stop``): each such request has a ``StopChecker`` (``stop_checker(request_id)``)
  that detokenizes its generated tokens; when the text contains a stop string the request ends with
  END_OF_SEQUENCE, tokens after the stop in a multi-step call are dropped, and ``visible_text`` /
  ``safe_text()`` give the text without it.
* **Structured output** (``ctx.json_schema``): an llguidance matcher per request fills the row's bitmask
  before each sampled token. The mask depends on the previous token, so a decode batch that holds a
  constrained row runs one step per device call (``num_steps`` calls, masks filled in between); batches
  without one keep multi-step decode. Constrained and free rows share the same programs.
* **Tools**: ``tool_parser`` parses a finished text into tool calls (``maxjax.pipelines.tools``).
* **Speculative decoding** (runtime ``speculative="ngram"|"draft"``): drafted tokens are verified in one device
  call per round, so a call may return up to ``num_steps x (K + 1)`` tokens per row; the host loop lives in
  ``maxjax.pipelines.speculative`` (``self.speculative``; None: off).
* **LoRA adapters** (``ctx.lora_name``, runtime ``max_loras > 0``): each row carries its adapter's slot into
  the programs, so rows with different adapters and base rows share one batch. ``add_lora`` / ``remove_lora``
  change the resident adapters between calls without compiling anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxjax.context import TextContext, check_lora_name
from maxjax.interfaces import GenerationStatus, LogProbabilities, TextGenerationInputs, TextGenerationOutput
from maxjax.pipelines.kv_admission import RequestPages
from maxjax.pipelines.rows import check_context, decode_budget, echo_targets, fill_sampling_row, wants_echo
from maxjax.pipelines.stops import StopChecker
from maxjax.pipelines.structured import GrammarCompiler, fill_bitmask, matcher_finished
from maxjax.runtime.config import bucket_for
from maxjax.runtime.engine import Engine, empty_decode_rows, empty_prefill_rows, empty_sampling, place_prefill_row
from maxjax.runtime.slots import SlotAllocator


def _log_probabilities(token_lp: float, top_ids: np.ndarray, top_values: np.ndarray, n: int) -> LogProbabilities:
    return LogProbabilities(token_log_probabilities=[float(token_lp)],
                            top_log_probabilities=[{int(i): float(v) for i, v in zip(top_ids[:n], top_values[:n])}])


def host_logprobs(lp: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A device ``LogProbs`` as host arrays (one copy each; never index device arrays: that compiles)."""
    return np.asarray(lp.token), np.asarray(lp.top_ids), np.asarray(lp.top_values)


class TextGenerationPipeline:
    """Implements ``TokenGenerator`` over an ``Engine``.

    ``tokenizer`` serves stop strings (detokenization), structured output (the grammar's vocabulary) and
    tool-call parsing; plain token generation never detokenizes.
    """

    def __init__(self, engine: Engine, tokenizer: Any = None, model_name: str = "",
                 draft_engine: Engine | None = None):
        self.engine = engine
        self.config = engine.config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.slots = SlotAllocator(self.config.max_batch_size)  # rows of the engine's generated-token counts
        self.pages = RequestPages(engine)  # KV cache pages (maxjax.runtime.kv_pages)
        self._contexts: dict[str, TextContext] = {}
        self._stops: dict[str, tuple[TextContext, StopChecker]] = {}
        self._echo: dict[str, list[LogProbabilities]] = {}
        self._grammar: GrammarCompiler | None = None
        self.speculative = None  # SpeculativeDecoding when config.speculative is set (draft_engine: "draft")
        if self.config.speculative is not None or draft_engine is not None:
            from maxjax.pipelines.speculative import SpeculativeDecoding, make_drafter

            self.speculative = SpeculativeDecoding(self, make_drafter(self.config, draft_engine))

    def warmup(self) -> int:
        """Compiles every program the bucket policy can ask for (the draft model's too); returns how many."""
        drafter = 0 if self.speculative is None else self.speculative.drafter.warmup()
        return self.engine.warmup() + drafter

    # -- TokenGenerator ------------------------------------------------------------------------------
    def next_token(self, inputs: TextGenerationInputs) -> dict[str, TextGenerationOutput]:
        num_steps = inputs.num_steps
        if not 1 <= num_steps <= self.config.max_num_steps:
            raise ValueError(f"num_steps must be in [1, {self.config.max_num_steps}] (the runtime's max_num_steps), "
                             f"got {num_steps}")
        batch = inputs.batch
        for request_id, ctx in batch.items():
            check_context(request_id, ctx, self.config, self.engine.vocab_size)
            check_lora_name(ctx.lora_name, self.lora_names, f"request {request_id!r}: lora_name")
        live = {rid: ctx for rid, ctx in batch.items() if not ctx.is_done}
        joining = [rid for rid in live if self.slots.slot_of(rid) is None]
        self._check_slots(live)
        self.pages.check(live, num_steps * self._tokens_per_step)
        try:
            self._prepare_features(live)
            now, later = self.pages.leaders_first([live[rid] for rid in joining])
            self._assign_slots(now)
            prefilled = self._prefill([c for c in live.values() if c.is_ce and self.pages.holds(c.request_id)])
            if later:  # they share the pages the first wave just computed
                self._assign_slots(later)
                prefilled |= self._prefill(later)
            self._decode([ctx for ctx in live.values() if not ctx.is_done], num_steps, prefilled)
        except BaseException:
            self._forget(joining)
            raise
        return {rid: self._output(rid, ctx) for rid, ctx in batch.items()}

    def _forget(self, request_ids: list[str]) -> None:
        """After a failed call: the requests that joined in it give back their slot and feature state, so a
        failure never keeps a KV cache slot. (Their contexts may be part-way through the prompt: build new ones
        to retry.)"""
        for rid in request_ids:
            if self.slots.slot_of(rid) is not None:
                self.pages.release(rid)  # keeping no partial page: the call failed
                self.release(rid)
            if self.speculative is not None:
                self.speculative.release(rid)
            self._stops.pop(rid, None)
            self._echo.pop(rid, None)

    @property
    def _tokens_per_step(self) -> int:
        """KV cache positions one decode step may add to a row: K + 1 with speculative verify rounds."""
        return 1 if self.speculative is None else self.config.num_speculative_tokens + 1

    def release(self, request_id: str) -> None:
        """Frees the request's KV cache pages and slot, and its stop checker. Unknown ids raise ValueError."""
        self.slots.release(request_id)
        ctx = self._contexts.pop(request_id, None)
        self.pages.release(request_id, ctx)
        if self.speculative is not None:
            self.speculative.release(request_id)
        self._stops.pop(request_id, None)
        self._echo.pop(request_id, None)
        if ctx is not None and ctx.is_assigned_to_cache:
            ctx.unassign_from_cache()

    # -- LoRA adapters -------------------------------------------------------------------------------
    @property
    def lora_names(self) -> list[str]:
        """The resident LoRA adapters a request's ``lora_name`` may name."""
        return [] if self.engine.lora is None else self.engine.lora.names

    def add_lora(self, name: str, path: Any) -> None:
        """Loads the PEFT adapter folder ``path`` as ``name`` (up to ``max_loras`` resident). Compiles nothing."""
        from maxjax.weights.lora import load_lora_adapter

        check_lora_name(name, field="LoRA adapter name")
        self.engine.require_lora()
        self.engine.add_lora(load_lora_adapter(path, self.engine.model_config, name))

    def remove_lora(self, name: str) -> None:
        """Unloads adapter ``name``; ValueError while a request that uses it holds a KV cache slot."""
        users = sorted(rid for rid, ctx in self._contexts.items() if ctx.lora_name == name)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by request(s) {users}: release them first")
        self.engine.remove_lora(name)

    # -- feature state ---------------------------------------------------------------------------------
    def stop_checker(self, request_id: str) -> StopChecker | None:
        """The request's stop-string checker (its ``visible_text``, ``safe_text()``), None without stops.
        Read it before ``release``."""
        entry = self._stops.get(request_id)
        return None if entry is None else entry[1]

    @property
    def tool_parser(self) -> Any:
        """The tool-call parser for this model's chat template, or None (see ``maxjax.pipelines.tools``)."""
        from maxjax.pipelines.tools import tool_parser_for

        return tool_parser_for(self.tokenizer, self.model_name)

    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammar is None:
            if self.tokenizer is None:
                raise ValueError("structured output (json_schema) needs the pipeline's tokenizer")
            self._grammar = GrammarCompiler.for_tokenizer(self.tokenizer, self.engine.vocab_size)
        return self._grammar

    def _prepare_features(self, live: dict[str, TextContext]) -> None:
        """Matchers for new constrained requests and checkers for new requests with stop strings."""
        matchers = {rid: self.grammar_compiler().matcher(ctx.json_schema) for rid, ctx in live.items()
                    if ctx.json_schema is not None and ctx.matcher is None and ctx.num_generated == 0}
        for rid, matcher in matchers.items():
            live[rid].set_matcher(matcher)
        for rid, ctx in live.items():
            entry = self._stops.get(rid)
            if ctx.stop and (entry is None or entry[0] is not ctx):
                if self.tokenizer is None:
                    raise ValueError(f"request {rid!r}: stop strings need the pipeline's tokenizer")
                checker = StopChecker(ctx.stop, self.tokenizer.stream_decoder(), ctx.prompt_tokens[-4:])
                self._stops[rid] = (ctx, checker)

    def _accept(self, ctx: TextContext, token: int, lp: LogProbabilities | None) -> None:
        """``ctx.update`` plus the checks that need text or the grammar."""
        before = ctx.end_idx
        ctx.update(token, lp)
        if ctx.end_idx == before or ctx.status is GenerationStatus.END_OF_SEQUENCE:
            return  # dropped, or an eos / stop token id (not returned, not text)
        entry = self._stops.get(ctx.request_id)
        if entry is not None and entry[1].push(token):
            ctx.update_status(GenerationStatus.END_OF_SEQUENCE)
        elif ctx.matcher is not None and not ctx.is_done and matcher_finished(ctx.matcher):
            ctx.update_status(GenerationStatus.END_OF_SEQUENCE)

    def _output(self, rid: str, ctx: TextContext) -> TextGenerationOutput:
        out = ctx.to_generation_output()
        echo = self._echo.pop(rid, None)
        if echo:
            out.log_probabilities = echo + (out.log_probabilities or [])
        entry = self._stops.get(rid)
        if entry is not None and ctx.is_done:
            entry[1].finish()
        return out

    # -- slots and pages -------------------------------------------------------------------------------
    def _check_slots(self, live: dict[str, TextContext]) -> None:
        """Every live request either holds a slot with this context or can take one now."""
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

    def _assign_slots(self, joining: list[TextContext]) -> None:
        """A slot and the cached prefix's pages for each joining request."""
        for ctx in joining:
            if ctx.is_assigned_to_cache:
                ctx.unassign_from_cache()
            ctx.assign_to_cache(self.slots.assign(ctx.request_id))
            self._contexts[ctx.request_id] = ctx
            self.pages.admit(ctx)

    # -- prefill ---------------------------------------------------------------------------------------
    def _prefill(self, pending: list[TextContext]) -> set[str]:
        """Encodes the prompts of ``pending`` chunk by chunk; returns the ids that sampled their first token."""
        sampled: set[str] = set()
        while pending:
            group, num_rows, length, kv_len, pending = self._next_prefill_group(pending)
            chunks = [min(ctx.active_length, self.config.max_prefill_len) for ctx in group]
            rows = empty_prefill_rows(num_rows, length, self.config.pages_per_row(kv_len))
            sampling = empty_sampling(num_rows, self.engine.vocab_size, self.config.max_stop_ids)
            offsets = [self._pack_prefill_row(rows, sampling, r, ctx, n)
                       for r, (ctx, n) in enumerate(zip(group, chunks))]
            first, first_lp, echo_lp = self.engine.prefill(rows, sampling, kv_len)
            first = np.asarray(first)
            first_lp = host_logprobs(first_lp) if (rows["logprobs"] & rows["samples"]).any() else None
            echo_lp = host_logprobs(echo_lp) if (rows["echo_targets"] >= 0).any() else None
            for r, (ctx, n, offset) in enumerate(zip(group, chunks, offsets)):
                if echo_lp is not None and wants_echo(ctx):
                    self._echo.setdefault(ctx.request_id, []).extend(
                        _log_probabilities(echo_lp[0][r, i], echo_lp[1][r, i], echo_lp[2][r, i], ctx.log_probabilities)
                        for i in offset + np.flatnonzero(rows["echo_targets"][r, offset:] >= 0))
                if n < ctx.active_length:  # more prompt to come: move the window, keep the context pending
                    ctx.bump_token_indices(start_idx=n)
                    self.pages.commit(ctx)
                    pending.append(ctx)
                    continue
                lp = None
                if first_lp is not None and ctx.log_probabilities:
                    lp = _log_probabilities(first_lp[0][r], first_lp[1][r], first_lp[2][r], ctx.log_probabilities)
                self._accept(ctx, int(first[r]), lp)
                self.pages.commit(ctx)
                sampled.add(ctx.request_id)
        return sampled

    def _next_prefill_group(self, pending: list[TextContext]) -> tuple[list[TextContext], int, int, int, list]:
        """The rows of the next prefill call, its (batch bucket, chunk length, span), and the rows left for later
        calls.

        Rows share a call only when their chunks need the same program shape, so a short prompt never pays for
        a long one's chunk or span; a call takes the largest batch bucket its rows fill (padding rows only when
        they fill none: prefill computes every row, so padding costs as much as a prompt).
        """
        cfg = self.config
        shapes = [cfg.prefill_shape(n, ctx.start_idx + n)
                  for ctx, n in ((c, min(c.active_length, cfg.max_prefill_len)) for c in pending)]
        length, kv_len = shapes[0]
        same = [i for i, shape in enumerate(shapes) if shape == (length, kv_len)]
        buckets = cfg.prefill_rows_per_call(length, kv_len)
        num_rows = max((b for b in buckets if b <= len(same)), default=buckets[0])  # else padded up to buckets[0]
        taken = set(same[:num_rows])
        return ([pending[i] for i in sorted(taken)], num_rows, length, kv_len,
                [ctx for i, ctx in enumerate(pending) if i not in taken])

    def _pack_prefill_row(self, rows, sampling, r: int, ctx: TextContext, n: int) -> int:
        """Fills row ``r`` with the next ``n`` prompt tokens of ``ctx``; returns the index of the first one."""
        offset = place_prefill_row(rows, r, ctx.next_tokens[:n], ctx.start_idx)
        rows["slots"][r] = ctx.cache_seq_id
        self.pages.fill(rows, r, ctx, ctx.start_idx + n)
        rows["samples"][r] = n == ctx.active_length
        rows["num_generated"][r] = ctx.num_generated
        rows["logprobs"][r] = ctx.log_probabilities > 0
        rows["lora_index"][r] = self.engine.lora_slot(ctx.lora_name)
        if wants_echo(ctx):
            rows["echo_targets"][r, offset:] = echo_targets(ctx, n)
        fill_sampling_row(sampling, r, ctx)
        if ctx.matcher is not None and rows["samples"][r]:
            fill_bitmask(ctx.matcher, sampling["bitmask"], r)
        return offset

    # -- decode ----------------------------------------------------------------------------------------
    def _decode(self, live: list[TextContext], num_steps: int, prefilled: set[str]) -> None:
        if self.speculative is not None:
            self.speculative.decode([(ctx, num_steps - (ctx.request_id in prefilled)) for ctx in live])
            return
        self.decode_work([(ctx, decode_budget(ctx, num_steps - (ctx.request_id in prefilled))) for ctx in live])

    def decode_work(self, work: list[tuple[TextContext, int]]) -> None:
        """Plain decode of (context, tokens it may generate) pairs."""
        work = [(ctx, b) for ctx, b in work if b > 0]
        if not any(ctx.matcher is not None for ctx, _ in work):
            if work:
                self._decode_call(work)
            return
        # A grammar mask depends on the token before it: one step per device call, masks filled in between.
        remaining = {ctx.request_id: b for ctx, b in work}
        for _ in range(max(remaining.values())):
            step = [(ctx, 1) for ctx, _ in work if remaining[ctx.request_id] > 0 and not ctx.is_done]
            if not step:
                break
            for ctx, _ in step:
                remaining[ctx.request_id] -= 1
            self._decode_call(step)

    def _decode_call(self, work: list[tuple[TextContext, int]]) -> None:
        """One decode program over ``work`` (context, tokens it may generate), results applied to the contexts."""
        cfg = self.config
        num_rows = bucket_for(len(work), cfg.batch_buckets, "decode batch")
        kv_len = bucket_for(max(ctx.end_idx - 1 + b for ctx, b in work), cfg.length_buckets, "sequence length")
        rows = empty_decode_rows(num_rows, cfg.pages_per_row(kv_len))
        sampling = empty_sampling(num_rows, self.engine.vocab_size, cfg.max_stop_ids)
        for r, (ctx, budget) in enumerate(work):
            rows["tokens"][r] = ctx.all_tokens[-1]
            rows["positions"][r] = ctx.end_idx - 1
            rows["steps"][r] = budget
            self.pack_generating_row(rows, sampling, r, ctx, ctx.end_idx - 1 + budget)
        tokens, lp = self.engine.decode(rows, sampling, kv_len)
        self.apply_tokens([ctx for ctx, _ in work], np.asarray(tokens),  # the one device -> host copy
                           host_logprobs(lp) if rows["logprobs"].any() else None)

    def pack_generating_row(self, rows: dict, sampling: dict, r: int, ctx: TextContext, num_tokens: int) -> None:
        """The fields a decode and a verify row share: slot, pages (grown to hold ``num_tokens`` positions),
        counts, logprobs, adapter, sampling, grammar mask."""
        rows["slots"][r] = ctx.cache_seq_id
        self.pages.fill(rows, r, ctx, num_tokens)
        rows["num_generated"][r] = ctx.num_generated
        rows["logprobs"][r] = ctx.log_probabilities > 0
        rows["lora_index"][r] = self.engine.lora_slot(ctx.lora_name)
        fill_sampling_row(sampling, r, ctx)
        if ctx.matcher is not None:
            fill_bitmask(ctx.matcher, sampling["bitmask"], r)

    def apply_tokens(self, contexts: list[TextContext], tokens: np.ndarray, lp: tuple | None) -> None:
        """Host tokens [N, B] (-1: none) and log-probabilities of a decode or verify call, row r for contexts[r]."""
        for r, ctx in enumerate(contexts):
            for s in range(tokens.shape[0]):
                token = int(tokens[s, r])
                if token < 0:
                    break
                row_lp = None
                if lp is not None and ctx.log_probabilities:
                    row_lp = _log_probabilities(lp[0][s, r], lp[1][s, r], lp[2][s, r], ctx.log_probabilities)
                self._accept(ctx, token, row_lp)
                if ctx.is_done:
                    break
            self.pages.commit(ctx)
