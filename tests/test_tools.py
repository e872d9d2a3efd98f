"""Tool calls: a Hermes/Qwen-style chat template renders tools, a model-style reply parses into calls,
and the calls render back into the conversation and parse again; other formats; no-format models."""

import json

import pytest

from maxjax.pipelines.tools import (NO_TOOL_FORMAT_MESSAGE, PARSERS, ToolCall, parse_tool_calls, require_tool_parser,
                                    tool_parser_for)
from maxjax.tokenizers import HFTokenizer, render_chat

# The shape of Qwen2.5's template (tools in <tools>, calls in <tool_call>, results in <tool_response>).
QWEN_STYLE_TEMPLATE = """
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}]


def test_hermes_round_trip_through_chat_template():
    messages = [{"role": "user", "content": "Weather in Paris and Tokyo?"}]
    prompt = render_chat(QWEN_STYLE_TEMPLATE, messages, tools=TOOLS)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in prompt and prompt.endswith("<|im_start|>assistant\n")
    parser = tool_parser_for(QWEN_STYLE_TEMPLATE)
    assert parser is PARSERS["hermes"]

    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>')
    parsed = parse_tool_calls(reply, parser)
    assert parsed.content == "Let me check."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_weather", {"city": "Tokyo"})]
    assert json.loads(parsed.tool_calls[0].arguments_json) == {"city": "Paris", "unit": "C"}

    # The calls go back into the conversation as an assistant turn, followed by the tool results.
    history = messages + [
        {"role": "assistant", "content": parsed.content,
         "tool_calls": [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                        for c in parsed.tool_calls]},
        {"role": "tool", "content": '{"temperature": 18}'},
    ]
    second = render_chat(QWEN_STYLE_TEMPLATE, history, tools=TOOLS)
    assert second.startswith(prompt[: prompt.index("<|im_start|>assistant")])
    assistant_turn = second.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    assert parse_tool_calls(assistant_turn, "hermes").tool_calls == parsed.tool_calls
    assert "<tool_response>\n{\"temperature\": 18}\n</tool_response>" in second


def test_invalid_call_stays_text():
    parsed = parse_tool_calls("<tool_call>{not json}</tool_call> and more", "hermes")
    assert parsed.tool_calls == [] and parsed.content == "<tool_call>{not json}</tool_call> and more"
    assert parse_tool_calls("just an answer").tool_calls == []
    with pytest.raises(ValueError, match="tool parser"):
        parse_tool_calls("x", "unknown")


def test_llama3_and_mistral_formats():
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "now", "parameters": {}}'
    parsed = parse_tool_calls(llama, "llama3_json")
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"}), ("now", {})]
    assert parse_tool_calls(llama).tool_calls == parsed.tool_calls  # found without naming the format
    assert parse_tool_calls("The answer is {\"a\": 1}", "llama3_json").tool_calls == []

    mistral = '[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]'
    parsed = parse_tool_calls(mistral)
    assert parsed.tool_calls == [ToolCall("get_weather", {"city": "Rome"}, "call_0")] and parsed.content == ""
    assert tool_parser_for("{{ '[TOOL_CALLS]' }}") is PARSERS["mistral"]
    assert tool_parser_for("{% if tools %}{{ '<|python_tag|>' }}{% endif %}") is PARSERS["llama3_json"]
    assert tool_parser_for("{% if tools %}{{ tools | tojson }}{% endif %}", "Qwen2.5-7B-Instruct") is PARSERS["hermes"]


def test_model_without_tool_format_says_so(smollm2_gguf):
    tokenizer = HFTokenizer.from_gguf(smollm2_gguf, max_length=256)
    assert tool_parser_for(tokenizer, "SmolLM2-135M-Instruct") is None
    with pytest.raises(ValueError, match="no tool-call format") as info:
        require_tool_parser(tokenizer, "SmolLM2-135M-Instruct")
    assert NO_TOOL_FORMAT_MESSAGE in str(info.value)
    # Its template really ignores tools: the prompt is the same with and without them.
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tools=TOOLS) == tokenizer.apply_chat_template(messages)
