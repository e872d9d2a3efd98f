"""Tool calls: parse a model's output text into structured calls (name + JSON arguments).

``tools`` reach the model through its chat template; how the model writes a call back depends on the
family it was trained as. Three formats are understood:

* ``hermes`` (Hermes, Qwen 2/2.5/3, many fine-tunes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, free text around them;
* ``llama3_json`` (Llama 3.1+): the whole reply is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several calls separated by ``;``;
* ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``.

``tool_parser_for(tokenizer)`` picks the format from the chat template (then the model name). A model
whose template has no tool format (SmolLM2-135M-Instruct's ChatML template ignores ``tools``) gets None:
tools cannot be offered to it, and ``NO_TOOL_FORMAT_MESSAGE`` says so. ``parse_tool_calls(text)`` works on
any text: without a parser it tries every format.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

NO_TOOL_FORMAT_MESSAGE = (
    "this model's chat template has no tool-call format: tools are not shown to the model and its output "
    "is not parsed into tool calls. Use a model whose chat template renders tools (Hermes/Qwen "
    "<tool_call>, Llama 3 JSON, Mistral [TOOL_CALLS]).")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str = ""

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    """The text outside tool calls, and the calls in order."""

    content: str
    tool_calls: list[ToolCall]


def _call(obj: Any, index: int) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name", "arguments" | "parameters"}`` object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args, f"call_{index}")


class HermesToolParser:
    name = "hermes"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        calls: list[ToolCall] = []
        content: list[str] = []
        last = 0
        for match in self._block.finditer(text):
            try:
                call = _call(json.loads(match.group(1)), len(calls))
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue  # not a valid call: it stays in the content
            content.append(text[last: match.start()])
            calls.append(call)
            last = match.end()
        content.append(text[last:])
        return ParsedOutput("".join(content).strip() if calls else text, calls)


class Llama3JsonToolParser:
    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):].lstrip()
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ParsedOutput(text, [])
            call = _call(obj, len(calls))
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ParsedOutput("", calls) if calls else ParsedOutput(text, [])


class MistralToolParser:
    name = "mistral"
    _marker = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedOutput:
        head, sep, rest = text.partition(self._marker)
        if not sep:
            return ParsedOutput(text, [])
        try:
            obj, _ = json.JSONDecoder().raw_decode(rest.strip())
        except json.JSONDecodeError:
            return ParsedOutput(text, [])
        items = obj if isinstance(obj, list) else [obj]
        calls = [_call(item, i) for i, item in enumerate(items)]
        if not calls or any(c is None for c in calls):
            return ParsedOutput(text, [])
        return ParsedOutput(head.strip(), calls)


PARSERS = {p.name: p for p in (HermesToolParser(), MistralToolParser(), Llama3JsonToolParser())}


def tool_parser_for(tokenizer: Any, model_name: str = "") -> Any:
    """The parser for a model's tool-call format, from its chat template (else its name); None when the
    model has no tool format (see ``NO_TOOL_FORMAT_MESSAGE``). ``tokenizer`` may be a chat template string."""
    template = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "chat_template", None) or ""
    if "<tool_call>" in template:
        return PARSERS["hermes"]
    if "[TOOL_CALLS]" in template:
        return PARSERS["mistral"]
    if "<|python_tag|>" in template or ("tools" in template and "ipython" in template):
        return PARSERS["llama3_json"]
    if "tools" in template:
        name = model_name.lower()
        by_name = (("qwen", "hermes"), ("hermes", "hermes"), ("mistral", "mistral"), ("llama-3", "llama3_json"))
        for key, parser in by_name:
            if key in name:
                return PARSERS[parser]
    return None


def require_tool_parser(tokenizer: Any, model_name: str = "") -> Any:
    """``tool_parser_for``, raising ValueError (naming ``tools``) when the model has no tool format."""
    parser = tool_parser_for(tokenizer, model_name)
    if parser is None:
        raise ValueError(f"tools: {NO_TOOL_FORMAT_MESSAGE}")
    return parser


def parse_tool_calls(text: str, parser: Any = None) -> ParsedOutput:
    """Splits ``text`` into content and tool calls with ``parser`` (a parser or its name), or, without one,
    with the first format that finds a call."""
    if isinstance(parser, str):
        if parser not in PARSERS:
            raise ValueError(f"tool parser must be one of {sorted(PARSERS)}, got {parser!r}")
        parser = PARSERS[parser]
    if parser is not None:
        return parser.parse(text)
    for candidate in PARSERS.values():
        parsed = candidate.parse(text)
        if parsed.tool_calls:
            return parsed
    return ParsedOutput(text, [])
