"""`maxjax serve` request fields that tests/test_server.py leaves out, each against `maxjax.LLM`.

One server for the module (a real process on 127.0.0.1) serves the real SmolLM2 GGUF and a tiny random model
whose chat template has the Llama 3 JSON tool format. Checked: `stream_options.include_usage` (exact token
counts), token-id prompts, `min_p` / `repetition_penalty` / `stop_token_ids`, chat `stop`, `tool_choice: "auto"`
(calls parsed by the model's format, plain text left alone), and last, SIGTERM with a drain timeout shorter
than an open stream: the stream ends cancelled and the process exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import httpx
import openai
import pytest

import tiny_models
from maxjax.interfaces import SamplingParams, TextGenerationRequest
from conftest import require
from serving import running_server

pytestmark = pytest.mark.slow

RUNTIME = dict(max_batch_size=4, max_seq_len=256, length_buckets=(128, 256), max_num_steps=8)  # test_server's
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
# Llama 3.1's tool format in a compact ChatML frame: tools listed in a system turn, a call is the whole reply as
# {"name": ..., "parameters": ...} (after <|python_tag|>, which is what marks the format).
TOOL_TEMPLATE = """
{%- if tools %}<|im_start|>system
Reply <|python_tag|>{"name": ..., "parameters": ...} to call one of: {% for tool in tools %}{{ tool.function | tojson }}{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""



@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, smollm2_gguf) -> Path:
    return tiny_models.hf_folder(tmp_path_factory.mktemp("tools") / "llama3-tools", smollm2_gguf,
                                 chat_template=TOOL_TEMPLATE)


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf, tool_model):
    tmp = tmp_path_factory.mktemp("serve_fields")
    args = ["--no-warmup", "--model", f"smollm2={smollm2_gguf}", "--model", f"tools={tool_model}",
            "--max-batch-size", str(RUNTIME["max_batch_size"]), "--max-seq-len", str(RUNTIME["max_seq_len"]),
            "--length-buckets", "128,256", "--max-num-steps", str(RUNTIME["max_num_steps"]),
            "--drain-timeout", "0.2", "--log-level", "warning"]
    with running_server(args, tmp) as server:
        yield server.proc, server.base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llm(smollm2_gguf, server):
    from maxjax.pipelines.llm import LLM

    return LLM(str(smollm2_gguf), progress=False, **RUNTIME)


def _raw(llm, prompt, params, **fields):
    """maxjax.LLM on a raw (non-chat) prompt."""
    llm.chat = False
    try:
        return llm.complete([prompt], params, **fields)[0]
    finally:
        llm.chat = True


def _prompt_tokens(llm, **request) -> list[int]:
    ctx = llm.tokenizer.build_context(TextGenerationRequest("count", 0, "smollm2", **request))
    return [int(t) for t in ctx.prompt_tokens]


def test_stream_options_include_usage_counts_exactly(client, llm):
    params = SamplingParams(max_new_tokens=12)
    ref = llm.complete([CHAT], params)[0]
    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref.text
    assert all(c.usage is None for c in body) and last.choices == []
    prompt = len(_prompt_tokens(llm, messages=CHAT))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, len(ref.tokens))
    assert last.usage.total_tokens == prompt + len(ref.tokens)

    ref = _raw(llm, PROMPT, params)
    chunks = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert "".join(c.choices[0].text for c in body) == ref.text and last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(_prompt_tokens(llm, prompt=PROMPT)),
                                                                      len(ref.tokens))
    plain = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices  # no usage chunk unless asked


def test_token_id_prompts_equal_their_text(client, llm):
    other = "def fibonacci(n):"
    ids, other_ids = _prompt_tokens(llm, prompt=PROMPT), _prompt_tokens(llm, prompt=other)
    by_text = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == _raw(llm, PROMPT, SamplingParams(max_new_tokens=10)).text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    both = client.completions.create(model="smollm2", prompt=[ids, other_ids], max_tokens=10, temperature=0)
    texts = {c.index: c.text for c in both.choices}
    assert texts == {0: by_text.choices[0].text,
                     1: client.completions.create(model="smollm2", prompt=other, max_tokens=10,
                                                  temperature=0).choices[0].text}


def test_min_p_repetition_penalty_and_stop_token_ids_equal_llm(client, llm):
    def completion(**body):
        extra = {k: body.pop(k) for k in ("min_p", "repetition_penalty", "stop_token_ids") if k in body}
        return client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, extra_body=extra,
                                         **body).choices[0]

    sampled = SamplingParams(max_new_tokens=16, top_k=0, temperature=1.5, seed=11)
    with_min_p = _raw(llm, PROMPT, dataclasses.replace(sampled, min_p=0.2)).text
    assert with_min_p != _raw(llm, PROMPT, sampled).text  # min_p matters for this seed
    assert completion(temperature=1.5, seed=11, min_p=0.2).text == with_min_p

    greedy = _raw(llm, PROMPT, SamplingParams(max_new_tokens=16))
    penalised = _raw(llm, PROMPT, SamplingParams(max_new_tokens=16, repetition_penalty=1.8)).text
    assert penalised != greedy.text
    assert completion(temperature=0, repetition_penalty=1.8).text == penalised

    stop_id = greedy.tokens[5]
    cut = _raw(llm, PROMPT, SamplingParams(max_new_tokens=16, stop_token_ids=[stop_id]))
    assert len(cut.tokens) < len(greedy.tokens)
    choice = completion(temperature=0, stop_token_ids=[stop_id])
    assert choice.text == cut.text and choice.finish_reason == "stop"


def test_chat_stop_strings_equal_llm(client, llm):
    params = SamplingParams(max_new_tokens=24)
    full = llm.generate(CHAT, params)
    assert " Paris" in full
    cut = llm.complete([CHAT], params, stop=[" Paris", "zzz"])[0]
    assert cut.text == full[: full.index(" Paris")]
    chat = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                          stop=[" Paris", "zzz"])
    assert chat.choices[0].message.content == cut.text and chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                            stop=" Paris", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice_auto_parses_the_models_format(client, tool_model):
    jsonschema = require("jsonschema")
    from maxjax.pipelines.llm import LLM

    tools_llm = LLM(str(tool_model), progress=False, **RUNTIME)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = SamplingParams(max_new_tokens=40)
    # A random model writes no call by itself: with a JSON schema in the model's own call format it must, and
    # "auto" then parses that reply into a call, as it would a trained model's.
    call_format = {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER},
                   "required": ["name", "parameters"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "call", "schema": call_format}}
    ref = tools_llm.complete([messages], params, tools=TOOLS, response_format=response_format)[0]
    (expected,) = ref.tool_calls
    reply = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, tool_choice="auto",
                                           max_tokens=40, temperature=0, response_format=response_format)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == expected.name == "get_weather" and arguments == expected.arguments
    jsonschema.validate(arguments, WEATHER)
    chunks = list(client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, tool_choice="auto",
                                                 max_tokens=40, temperature=0, response_format=response_format,
                                                 stream=True))
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [("get_weather", arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Unconstrained, the random model's text is no call: it comes back as content.
    ref = tools_llm.complete([messages], params, tools=TOOLS)[0]
    assert ref.tool_calls == []
    reply = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, tool_choice="auto",
                                           max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == ref.text and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_sigterm_past_the_drain_timeout_cancels_the_stream_and_exits_zero(server, llm):
    """Runs last: a stream longer than the 0.2 s drain timeout is cancelled, ends with an error event and
    [DONE], and the process still exits 0."""
    proc, base = server
    max_tokens = RUNTIME["max_seq_len"] - len(_prompt_tokens(llm, prompt="Once upon a time"))
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        lines = (line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))
        events.append(next(lines))
        proc.send_signal(signal.SIGTERM)
        events += list(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "cancelled" in chunks[-1]["error"]["message"] and chunks[-1]["error"]["type"] == "server_error"
    finished = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finished and not any(finished)  # it never reached its length
    assert proc.wait(timeout=60) == 0
