"""OpenAI response bodies from scheduler outputs: choices, log-probabilities, tool calls, usage, SSE.

A ``Choice`` accumulates the ``TextDelta``s of one request; ``completion_*`` and ``chat_*`` turn its
state into the JSON of a whole response or of one streamed chunk.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from maxjax.interfaces import GenerationStatus, LogProbabilities
from maxjax.pipelines.tools import ToolCall, parse_tool_calls
from maxjax.server.scheduler import TextDelta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event (``data: ...``)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def finish_reason(status: GenerationStatus | None) -> str | None:
    if status is None or not status.is_done:
        return None
    return "length" if status is GenerationStatus.MAXIMUM_LENGTH else "stop"


@dataclass
class Choice:
    """The accumulated output of one request (one choice)."""

    index: int
    prompt_tokens: int
    text: str = ""
    num_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    log_probabilities: list[LogProbabilities] = field(default_factory=list)
    prompt_log_probabilities: list[LogProbabilities] = field(default_factory=list)
    status: GenerationStatus | None = None
    stop_token: tuple[int, LogProbabilities | None] | None = None

    def add(self, delta: TextDelta) -> None:
        self.text += delta.text
        self.tokens += delta.tokens
        self.num_tokens += len(delta.tokens)
        self.log_probabilities += delta.log_probabilities
        self.prompt_log_probabilities += delta.prompt_log_probabilities
        self.status = delta.final_status
        self.stop_token = delta.stop_token


def prompt_only(delta: TextDelta) -> TextDelta:
    """The delta of a ``max_tokens=0`` completion: the prompt's log-probabilities, nothing generated (the
    pipeline samples one token, which is dropped)."""
    return TextDelta([], "", [], GenerationStatus.MAXIMUM_LENGTH, delta.prompt_log_probabilities)


def usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class TokenText:
    """Token ids -> their text (for log-probability entries), cached per id."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self._tokenizer.decode_tokens([token])
        return text


# ---- /v1/completions ------------------------------------------------------------------------------------------

def completion_logprobs(tokens: list[int], lps: list[LogProbabilities | None], top: int, token_text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """The legacy ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp in zip(tokens, lps):
        text = token_text(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if lp is None:  # the first prompt token (echo) has no log-probability
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp.token_log_probabilities[0])
        out["top_logprobs"].append({token_text(t): v for t, v in list(lp.top_log_probabilities[0].items())[:top]})
    return out


def completion_choice(choice: Choice, delta_text: str, delta: TextDelta | None, logprobs: int | None,
                      token_text: TokenText, echo_tokens: list[int] | None = None, offset: int = 0) -> dict[str, Any]:
    """One choice of a completion (``delta`` None: the whole accumulated choice)."""
    tokens = choice.tokens if delta is None else delta.tokens
    lps: list[Any] = choice.log_probabilities if delta is None else delta.log_probabilities
    stop = choice.stop_token if delta is None else delta.stop_token
    if stop is not None and stop[1] is not None:  # the eos that ended it: listed, never in the text
        tokens, lps = tokens + [stop[0]], lps + [stop[1]]
    body: dict[str, Any] = {"index": choice.index, "text": delta_text, "logprobs": None,
                            "finish_reason": finish_reason(choice.status if delta is None else delta.final_status)}
    if logprobs is not None:
        if echo_tokens:
            prompt_lps = [None] + list(choice.prompt_log_probabilities if delta is None
                                       else delta.prompt_log_probabilities)
            tokens, lps = echo_tokens + tokens, prompt_lps[:len(echo_tokens)] + list(lps)
        body["logprobs"] = completion_logprobs(tokens, lps, logprobs, token_text, offset)
    return body


def completion_body(request_id: str, model: str, choices: list[dict[str, Any]], usage_: dict | None,
                    created: int) -> dict[str, Any]:
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


# ---- /v1/chat/completions ---------------------------------------------------------------------------------------

def chat_logprobs(tokens: list[int], lps: list[LogProbabilities], top: int, token_text: TokenText) -> dict:
    def entry(token: int, value: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, lp in zip(tokens, lps):
        item = entry(token, lp.token_log_probabilities[0])
        item["top_logprobs"] = [entry(t, v) for t, v in list(lp.top_log_probabilities[0].items())[:top]]
        content.append(item)
    return {"content": content}


@dataclass
class ToolMode:
    """How a chat reply becomes tool calls: by the model's format (``parser``), or as JSON the reply was
    constrained to (``forced``: the function's name, or None when the JSON names it)."""

    parser: Any = None
    forced: bool = False
    forced_name: str | None = None

    @property
    def active(self) -> bool:
        return self.parser is not None or self.forced

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished reply."""
        if self.forced:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short (max_tokens): the text is returned as is
            if self.forced_name is not None:
                return None, [ToolCall(self.forced_name, obj, "call_0")]
            return None, [ToolCall(obj["name"], obj["arguments"], "call_0")]
        parsed = parse_tool_calls(text, self.parser)
        return (parsed.content or None) if parsed.tool_calls else text, parsed.tool_calls


def tool_calls_json(calls: list[ToolCall], request_id: str) -> list[dict[str, Any]]:
    return [{"id": f"call_{request_id[-12:]}_{i}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments_json}} for i, call in enumerate(calls)]


def chat_message(choice: Choice, tools: ToolMode, request_id: str) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished chat choice and its finish reason."""
    reason = finish_reason(choice.status)
    if not tools.active:
        return {"role": "assistant", "content": choice.text}, reason
    content, calls = tools.split(choice.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = tool_calls_json(calls, request_id)
        reason = "tool_calls"
    return message, reason


def chat_body(request_id: str, model: str, created: int, choice: Choice, tools: ToolMode, logprobs: int | None,
              token_text: TokenText) -> dict[str, Any]:
    message, reason = chat_message(choice, tools, request_id)
    lp = chat_logprobs(choice.tokens, choice.log_probabilities, logprobs, token_text) if logprobs is not None else None
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}],
            "usage": usage([choice])}


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def now() -> int:
    return int(time.time())
