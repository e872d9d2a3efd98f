"""OpenAI request bodies (pydantic) and their mapping onto the MAX protocol's requests.

Field checks that need no model (ranges, types, empty lists) live in the pydantic models, so FastAPI
rejects them before a handler runs; checks that need the model (prompt length, chat template, JSON
schema, tool format) raise ``InvalidRequest`` naming the OpenAI field. Either way the request never
reaches the device.

Sampling follows OpenAI: ``temperature`` defaults to 1 (sampling), ``temperature=0`` is greedy, and a
request without ``seed`` gets a random one. ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos`` and ``stop_token_ids`` are accepted as extra fields (``extra_body`` in the openai client), as is
``response_format`` on completions (vLLM's spelling); ``user`` is accepted and ignored. Any other field is refused
(HTTP 400 naming it, as OpenAI does): a misspelt option must not be silently dropped.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from maxjax.interfaces import SamplingParams, TextGenerationRequest


EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids")


class InvalidRequest(ValueError):
    """A request the server refuses with HTTP ``status`` (400); ``param`` is the OpenAI field at fault."""

    status = 400

    def __init__(self, param: str | None, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(InvalidRequest):
    """HTTP 404 ``model_not_found``: the request names a model this server does not serve (OpenAI's answer)."""

    status = 404

    def __init__(self, message: str):
        super().__init__("model", message, code="model_not_found")


class ModelNotReady(InvalidRequest):
    """HTTP 503: the model is served here but still loading (or failed to load)."""

    status = 503

    def __init__(self, message: str):
        super().__init__("model", message, code="model_not_ready")


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
    # An unknown field is refused (400 naming it): a misspelt option would otherwise be dropped without a word.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, unused
    # Extra sampling fields (vLLM spelling).
    top_k: int | None = Field(None, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.n != 1:
            raise InvalidRequest("n", f"n must be 1 (one choice per request), got {self.n}")
        if self.logit_bias:
            raise InvalidRequest("logit_bias", "logit_bias is not supported")
        greedy = self.temperature == 0.0
        try:
            return SamplingParams(
                top_k=1 if greedy else (self.top_k or 0), temperature=1.0 if greedy else self.temperature,
                top_p=self.top_p, min_p=self.min_p, frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty,
                max_new_tokens=max_tokens, min_new_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                stop_token_ids=self.stop_token_ids,
                seed=secrets.randbelow(2**31) if self.seed is None else self.seed)
        except ValueError as error:
            field = str(error).split(" ", 1)[0]
            names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
            raise InvalidRequest(names.get(field, field), str(error)) from None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0: with echo, the prompt's log-probabilities only
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    response_format: "ResponseFormat | None" = None  # an extension, as in vLLM: structured output as on chat

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequest("prompt", "prompt must not be empty")
        return list(prompt)

    def to_requests(self, request_id: str, lora_name: str | None = None) -> list[TextGenerationRequest]:
        if self.suffix:
            raise InvalidRequest("suffix", "suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens", "max_tokens=0 needs echo=true (it scores the prompt, generates nothing)")
        params = self.sampling_params(1 if self.max_tokens == 0 else self.max_tokens)  # 0: one, dropped
        response_format = self.response_format.as_dict() if self.response_format else None
        return [TextGenerationRequest(f"{request_id}-{i}", i, self.model, lora_name=lora_name, prompt=p,
                                      sampling_params=params, logprobs=self.logprobs or 0, echo=self.echo,
                                      stop=self.stop, response_format=response_format)
                for i, p in enumerate(self.prompts())]


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: tool-call arguments as objects, not JSON strings."""
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        for call in message.get("tool_calls", []):
            function = call.get("function", {})
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    raise InvalidRequest("messages", "tool_calls arguments must be a JSON object") from None
        return message


class FunctionSpec(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class JsonSchemaSpec(_Body):
    name: str = "output"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def as_dict(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidRequest("response_format", "response_format of type json_schema needs json_schema.schema")
        return {"type": "json_schema", "json_schema": {"name": self.json_schema.name,
                                                       "schema": self.json_schema.schema_}}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def forced_tool_schema(self) -> tuple[dict[str, Any], str | None] | None:
        """For ``tool_choice`` "required" or a named function: the JSON schema the reply is constrained to, and
        the forced function's name (None for "required": the reply names it)."""
        choice = self.tool_choice
        if not self.tools or choice in (None, "none", "auto"):
            if isinstance(choice, dict) or choice == "required":
                raise InvalidRequest("tool_choice", "tool_choice needs tools")
            return None
        specs = {t.function.name: t.function.parameters or {"type": "object"} for t in self.tools}
        if choice == "required":
            return {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                               "required": ["name", "arguments"], "additionalProperties": False}
                              for name, params in specs.items()]}, None
        name = choice.get("function", {}).get("name") if choice.get("type") == "function" else None
        if name not in specs:
            raise InvalidRequest("tool_choice", f"tool_choice must name one of the tools {sorted(specs)}, "
                                                f"got {choice!r}")
        return specs[name], name

    def to_request(self, request_id: str, lora_name: str | None = None) -> TextGenerationRequest:
        params = self.sampling_params(self.max_completion_tokens or self.max_tokens)
        messages = [m.for_template() for m in self.messages]
        response_format = self.response_format.as_dict() if self.response_format else None
        forced = self.forced_tool_schema()
        if forced is not None:
            if response_format is not None:
                raise InvalidRequest("response_format", "response_format cannot be combined with a forced tool_choice")
            response_format = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": forced[0]}}
        logprobs = max(1, self.top_logprobs or 0) if self.logprobs else 0
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        return TextGenerationRequest(request_id, 0, self.model, lora_name=lora_name, messages=messages, tools=tools,
                                     response_format=response_format, logprobs=logprobs, stop=self.stop,
                                     sampling_params=params)


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # accepted, unused

    def inputs(self) -> list[str | list[int]]:
        data = self.input
        if isinstance(data, str) or (data and isinstance(data[0], int)):
            data = [data]
        if not data or any(len(x) == 0 for x in data):
            raise InvalidRequest("input", "input must be a non-empty string, list of strings or token ids")
        return list(data)


class SpeechRequest(_Body):
    model: str
    input: str = Field(min_length=1, max_length=4096)
    voice: str | None = None
    response_format: Literal["wav"] = "wav"
    speed: float = Field(1.0, ge=1.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)


CompletionRequest.model_rebuild()
