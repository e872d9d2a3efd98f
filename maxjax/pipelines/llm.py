"""``LLM``: a notebook-friendly wrapper built only on the public protocol.

It turns prompts (strings, or chat message lists) into ``TextGenerationRequest``s, contexts via the
tokenizer's ``new_context``, and text via ``next_token`` / ``release`` with multi-step decode. Requests beyond
the runtime's ``max_batch_size`` wait in a queue and join as others finish (continuous batching).
Stop strings are cut from the text (the pipeline's stop checker); with ``tools``, the model's tool calls
are parsed into ``Completion.tool_calls`` by the parser of its chat-template family.

Sampling rule (as HF and vLLM, and unlike the protocol's greedy default ``top_k=1``): asking for a
temperature, ``top_p`` or ``min_p`` without a ``top_k`` samples from the whole vocabulary (``top_k=0``);
see ``resolve_sampling``. ``temperature=0`` is greedy.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maxjax.interfaces import SamplingParams, TextGenerationInputs, TextGenerationRequest
from maxjax.pipelines.kv_admission import set_aside
from maxjax.progress import RequestBar, show_progress
from maxjax.runtime.kv_pages import KVCacheFull

Prompt = str | Sequence[dict]
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"stop"}  # stop: a request field
# Request fields a caller may set by keyword (the rest are set by the wrapper: ids, model, prompt or messages).
REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(TextGenerationRequest)) - {
    "request_id", "index", "model_name", "prompt", "messages", "sampling_params", "timestamp_ns", "request_path"}


def check_fields(fields: dict[str, Any]) -> None:
    """ValueError naming keywords that are neither request fields nor SamplingParams fields (typos)."""
    unknown = sorted(set(fields) - REQUEST_FIELDS - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown keyword argument(s) {unknown}: expected request fields {sorted(REQUEST_FIELDS)} "
                         f"or SamplingParams fields {sorted(SAMPLING_FIELDS)}")
log = logging.getLogger("maxjax")


def resolve_sampling(params: SamplingParams | None = None, **given: Any) -> SamplingParams:
    """``params`` (default: the protocol's greedy defaults) with the SamplingParams fields in ``given``, under
    the wrapper's rule: a temperature (other than 0, or given by name), ``top_p < 1`` or ``min_p > 0``
    without a top_k (none given, and ``params.top_k`` left at its default 1) samples with ``top_k=0``."""
    merged = dataclasses.replace(params or SamplingParams(), **given)
    top_k_set = "top_k" in given or (params is not None and params.top_k != 1)
    temperature_asked = merged.temperature > 0 and ("temperature" in given or merged.temperature != 1)
    if not top_k_set and (temperature_asked or merged.top_p < 1 or merged.min_p > 0):
        return dataclasses.replace(merged, top_k=0)
    return merged


@dataclass
class Completion:
    """One finished request: its text, tokens, status and (when asked) log-probabilities and tool calls.

    ``log_probabilities`` has one entry per generated token; with ``echo=True`` the prompt tokens' entries
    (prompt tokens 1.., the first has none) are in ``prompt_log_probabilities``.
    """

    text: str
    tokens: list[int]
    final_status: Any
    log_probabilities: list | None = None
    prompt_log_probabilities: list | None = None
    tool_calls: list = field(default_factory=list)


def _is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, numbers.Integral)
                                                                      and not isinstance(t, bool) for t in prompt)


class LLM:
    """``LLM(model).generate(prompts, sampling_params)`` -> text; ``LLM(model).stream(prompt)`` -> text pieces.

    ``model`` is anything ``maxjax.load_model`` takes (None: SmolLM2-135M-Instruct); ``runtime`` holds
    ``RuntimeConfig`` fields. A string prompt is rendered with the model's chat template when it has one
    (``chat=False`` sends it raw); a list of ``{"role", "content"}`` dicts is always a conversation; a list of
    token ids is sent as is.
    Sampling: a ``SamplingParams`` and/or its fields by name (``generate(p, temperature=0.7, seed=1)``),
    under the rule of ``resolve_sampling``. ``progress=True`` (default) reports loading and each program's
    compilation (or load from the compile cache) on stderr.
    ``lora_adapters={name: PEFT folder}`` loads LoRA adapters; ``generate(..., lora_name=name)`` uses one.
    ``speculative="ngram"`` (or ``"draft"`` with ``draft_model=``) turns on speculative decoding.
    """

    def __init__(self, model: str | Path | None = None, *, chat: bool = True, progress: bool = True,
                 **runtime: Any):
        from maxjax.pipelines.registry import load_text_pipeline

        if progress:
            show_progress()
        start = time.perf_counter()
        log.info("loading %s", model or "the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")
        self.tokenizer, self.pipeline = load_text_pipeline(model, progress=progress, **runtime)
        log.info("loaded %s in %.1f s (programs compile on first use, or load from the compile cache)",
                 self.pipeline.model_name, time.perf_counter() - start)
        self.chat = chat and getattr(self.tokenizer, "chat_template", None) is not None
        self.progress = progress
        self.num_steps = self.pipeline.config.max_num_steps
        self._ids = itertools.count()
        self.last_num_tokens = 0  # tokens generated by the last stream()
        self.last_status: Any = None  # final status of the last stream()

    def request(self, prompt: Prompt, sampling_params: SamplingParams | None = None, **fields: Any
                ) -> TextGenerationRequest:
        """The protocol request for one prompt (``fields``: logprobs, echo, stop, response_format, tools...,
        and SamplingParams fields by name)."""
        check_fields(fields)
        request_id = f"llm-{next(self._ids)}"
        given = {k: fields.pop(k) for k in list(fields) if k in SAMPLING_FIELDS}
        params = resolve_sampling(sampling_params, **given)
        if _is_messages(prompt):
            return TextGenerationRequest(request_id, 0, self.pipeline.model_name, messages=list(prompt),
                                         sampling_params=params, **fields)
        if _is_token_ids(prompt):  # sent as is: no chat template (scoring, evaluation harnesses)
            return TextGenerationRequest(request_id, 0, self.pipeline.model_name, prompt=[int(t) for t in prompt],
                                         sampling_params=params, **fields)
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a str, a list of message dicts or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty (or only whitespace)")
        if self.chat:
            return TextGenerationRequest(request_id, 0, self.pipeline.model_name,
                                         messages=[{"role": "user", "content": prompt}], sampling_params=params,
                                         **fields)
        return TextGenerationRequest(request_id, 0, self.pipeline.model_name, prompt=prompt,
                                     sampling_params=params, **fields)

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | None = None, *,
                 progress: bool | None = None, **fields: Any) -> str | list[str]:
        """Text for one prompt, or a list of texts for a list of prompts (same order). A list shows a progress
        bar on stderr (``progress=False``, or ``LLM(progress=False)``, hides it)."""
        check_fields(fields)
        single = isinstance(prompts, str) or _is_messages(prompts)
        completions = self.complete([prompts] if single else list(prompts), sampling_params, progress=progress,
                                    **fields)
        texts = [c.text for c in completions]
        return texts[0] if single else texts

    def complete(self, prompts: Sequence[Prompt], sampling_params: SamplingParams | None = None, *,
                 progress: bool | None = None, **fields: Any) -> list[Completion]:
        """Full results (text, tokens, status, log-probabilities) for a list of prompts; a progress bar over
        2+ prompts unless ``progress=False`` (None: the ``progress`` the LLM was made with)."""
        check_fields(fields)
        requests = [self.request(p, sampling_params, **fields) for p in prompts]
        contexts = {r.request_id: self.tokenizer.build_context(r) for r in requests}  # validates all first
        parser = self._tool_parser() if fields.get("tools") else None
        tokens: dict[str, list[int]] = {rid: [] for rid in contexts}
        logprobs: dict[str, list] = {rid: [] for rid in contexts}
        texts: dict[str, str] = {}
        status: dict[str, Any] = {}
        waiting = list(contexts)
        active: dict[str, Any] = {}
        capacity = room = self.pipeline.config.max_batch_size  # room: fewer after a request was set aside
        bar = RequestBar(len(requests), (self.progress if progress is None else progress) and len(requests) > 1)
        try:
            while waiting or active:
                while waiting and len(active) < room:
                    rid = waiting.pop(0)
                    active[rid] = contexts[rid]
                try:
                    outputs = self.pipeline.next_token(TextGenerationInputs(dict(active), self.num_steps))
                except KVCacheFull:  # too few free pages: the newest request waits (or is preempted)
                    rid = set_aside(self.pipeline, active)
                    del active[rid]
                    waiting.insert(0, rid)
                    room = len(active)  # until a request finishes and frees its pages
                    continue
                for rid, out in outputs.items():
                    tokens[rid] += out.tokens
                    logprobs[rid] += out.log_probabilities or []
                    if out.is_done:
                        status[rid] = out.final_status
                        texts[rid] = self._text(rid, tokens[rid])
                        self.pipeline.release(rid)
                        del active[rid]
                        room = capacity
                        bar.update(len(tokens[rid]))
        finally:
            self._release_held(active)
            bar.close()
        results = []
        for r in requests:
            rid, ctx = r.request_id, contexts[r.request_id]
            echoed = len(ctx.prompt_tokens) - 1 if ctx.log_probabilities_echo and ctx.log_probabilities else 0
            lps = logprobs[rid]
            calls = self._tool_calls(texts[rid], parser)
            results.append(Completion(texts[rid], tokens[rid], status[rid], lps[echoed:] or None,
                                      lps[:echoed] or None, calls))
        return results

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, **fields: Any
               ) -> Iterator[str]:
        """Yields the text of one prompt piece by piece as it is generated."""
        request = self.request(prompt, sampling_params, **fields)
        ctx = self.tokenizer.build_context(request)
        decoder = self.tokenizer.stream_decoder()
        rid = request.request_id
        self.last_num_tokens, self.last_status = 0, None
        try:
            while True:
                out = self.pipeline.next_token(TextGenerationInputs({rid: ctx}, self.num_steps))[rid]
                self.last_num_tokens += len(out.tokens)
                checker = self.pipeline.stop_checker(rid)
                # With stop strings, only text that cannot turn into a stop string is shown.
                piece = checker.take_new_text() if checker else decoder.push(out.tokens)
                if out.is_done and not checker:
                    piece += decoder.flush()
                if piece:
                    yield piece
                if out.is_done:
                    self.last_status = out.final_status
                    return
        finally:
            self._release_held([rid])

    def _release_held(self, request_ids: Any) -> None:
        """Frees the slots these requests still hold: a failed ``next_token`` already gave back the slots of the
        requests that joined in it, and releasing them again would replace the original error."""
        for rid in request_ids:
            if self.pipeline.pages.holds(rid):
                self.pipeline.release(rid)

    def _text(self, request_id: str, tokens: list[int]) -> str:
        """The finished text: without its stop string when one ended it. Read before ``release``."""
        checker = self.pipeline.stop_checker(request_id)
        if checker is not None:
            return checker.visible_text
        return self.tokenizer.decode_tokens(tokens, skip_special_tokens=True)

    def _tool_parser(self) -> Any:
        parser = self.pipeline.tool_parser
        if parser is None:
            from maxjax.pipelines.tools import NO_TOOL_FORMAT_MESSAGE

            warnings.warn(f"tools: {NO_TOOL_FORMAT_MESSAGE}", stacklevel=3)
        return parser

    @staticmethod
    def _tool_calls(text: str, parser: Any) -> list:
        if parser is None:
            return []
        from maxjax.pipelines.tools import parse_tool_calls

        return parse_tool_calls(text, parser).tool_calls
