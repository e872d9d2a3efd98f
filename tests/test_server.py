"""`maxjax serve` as a real process on 127.0.0.1, called with the official `openai` client.

One server per module serves four models: the real SmolLM2 GGUF (chat/completions), all-MiniLM-L6-v2
(embeddings), a tiny random Qwen2 with a tool-call chat template, and the random Orpheus speech models.
Texts are checked against `maxjax.LLM` on the same weights and runtime config, embeddings against
`maxjax.embed`; the last test stops the server with SIGTERM.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import require
from serving import running_server

from maxjax.interfaces import SamplingParams

pytestmark = pytest.mark.slow

RUNTIME = dict(max_batch_size=4, max_seq_len=256, length_buckets=(128, 256), max_num_steps=8)  # as test_generate_real: shared compile cache
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
# A compact Hermes/Qwen-style template (tools listed, calls in <tool_call>, results in <tool_response>), short
# enough for the server's max_seq_len of 256.
TOOL_TEMPLATE = """
{%- if tools %}<|im_start|>system
Tools: {% for tool in tools %}{{ tool.function | tojson }}{% endfor %}
Reply <tool_call>{"name": ..., "arguments": ...}</tool_call> to call one.<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% elif m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""



def _tool_model(folder: Path, smollm2_gguf: Path) -> Path:
    """A tiny random Qwen2 with SmolLM2's vocabulary and a Hermes/Qwen tool-call chat template."""
    import torch
    import transformers

    from maxjax.tokenizers import HFTokenizer

    config = transformers.Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    HFTokenizer.from_gguf(smollm2_gguf, max_length=512).save(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = TOOL_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf, minilm_dir):
    tmp = tmp_path_factory.mktemp("serve")
    tools_dir = _tool_model(tmp / "qwen-tools", smollm2_gguf)
    args = ["--no-warmup", "--model", "smollm2", "--model", "minilm",  # the built-in names, served under those names
            "--model", f"qwen-tools={tools_dir}", "--model", "orpheus=random-orpheus",
            "--max-batch-size", str(RUNTIME["max_batch_size"]), "--max-seq-len", str(RUNTIME["max_seq_len"]),
            "--length-buckets", "128,256", "--max-num-steps", str(RUNTIME["max_num_steps"]),
            "--drain-timeout", "600", "--log-level", "warning"]  # the drain lets an open stream end, however slow
    with running_server(args, tmp) as server:
        yield server.proc, server.base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llm(smollm2_gguf, server):
    from maxjax.pipelines.llm import LLM

    return LLM(str(smollm2_gguf), **RUNTIME)


def _health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=5).json()["models"]


def _metric(base: str, name: str, **labels) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _raw(llm, prompt, params, **fields):
    """maxjax.LLM on a raw (non-chat) prompt."""
    llm.chat = False
    try:
        return llm.complete([prompt], params, **fields)[0]
    finally:
        llm.chat = True


def _stream_text(stream, kind="chat") -> str:
    pieces = []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append((choice.delta.content if kind == "chat" else choice.text) or "")
    return "".join(pieces)


GREEDY = dict(temperature=0)
SEEDED = dict(temperature=0.8, top_p=0.9, seed=7)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chat_and_completions_equal_llm(client, llm, sampling):
    params = SamplingParams(max_new_tokens=24, **({} if sampling is GREEDY else dict(
        top_k=0, temperature=0.8, top_p=0.9, seed=7)))
    reference = llm.complete([CHAT], params)[0]
    expected_chat = reference.text
    chat = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, **sampling)
    assert chat.choices[0].message.content == expected_chat
    assert chat.usage.completion_tokens == len(reference.tokens)
    stream = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, stream=True, **sampling)
    assert _stream_text(stream) == expected_chat

    prompt = "The three primary colors are"
    expected = _raw(llm, prompt, params).text
    completion = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, **sampling)
    assert completion.choices[0].text == expected
    stream = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, stream=True, **sampling)
    assert _stream_text(stream, "completion") == expected


def test_stop_strings_and_finish_reasons(client, llm):
    prompt = "The three primary colors are"
    expected = _raw(llm, prompt, SamplingParams(max_new_tokens=24), stop=[" blue"])
    completion = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0,
                                           stop=[" blue"])
    assert completion.choices[0].text == expected.text and " blue" not in expected.text
    assert completion.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0, stop=[" blue"],
                                       stream=True)
    assert _stream_text(stream, "completion") == expected.text
    short = client.completions.create(model="smollm2", prompt=prompt, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_logprobs_and_echo_equal_llm(client, llm):
    prompt = "The three primary colors are"
    ref = _raw(llm, prompt, SamplingParams(max_new_tokens=6), logprobs=3, echo=True)
    out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                    echo=True).choices[0]
    assert out.text == prompt + ref.text
    num_prompt = len(ref.prompt_log_probabilities) + 1
    lp = out.logprobs
    assert len(lp.tokens) == num_prompt + len(ref.tokens) and lp.token_logprobs[0] is None
    expected = [x.token_log_probabilities[0] for x in ref.prompt_log_probabilities + ref.log_probabilities]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-5)  # same programs, same weights
    assert all(len(top) == 3 for top in lp.top_logprobs[1:])

    chat = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    ref = llm.complete([CHAT], SamplingParams(max_new_tokens=6), logprobs=2)[0]
    content = chat.choices[0].logprobs.content
    np.testing.assert_allclose([c.logprob for c in content], [x.token_log_probabilities[0]
                                                              for x in ref.log_probabilities], atol=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_json_schema_response_format(client, llm):
    jsonschema = require("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0,
                                          response_format=response_format)
    text = chat.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    assert text == llm.generate(messages, SamplingParams(max_new_tokens=48), response_format=response_format)
    anything = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_response_format_on_completions(client, llm):
    """As vLLM: a raw completion constrained to a JSON schema, the same text as maxjax.LLM gives."""
    jsonschema = require("jsonschema")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "color", "schema": schema}}
    prompt = "The sky as JSON:"
    out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"response_format": response_format})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    assert out.choices[0].text == _raw(llm, prompt, SamplingParams(max_new_tokens=24),
                                       response_format=response_format).text
    with pytest.raises(openai.BadRequestError) as info:  # a schema llguidance cannot compile: 400, as on chat
        client.completions.create(model="smollm2", prompt=prompt, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})
    assert info.value.body["param"] == "response_format"


def test_tool_call_round_trip(client):
    jsonschema = require("jsonschema")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="qwen-tools", messages=messages, tools=TOOLS, max_tokens=48,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    second = client.chat.completions.create(model="qwen-tools", messages=history, tools=TOOLS, max_tokens=4,
                                            temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are in the prompt
    # a plain answer after the tool's result (greedy, no tool call), cut at its 4 tokens
    assert second.choices[0].finish_reason == "length" and second.usage.completion_tokens == 4
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content

    required = client.chat.completions.create(model="qwen-tools", messages=messages, tools=TOOLS, max_tokens=48,
                                              tool_choice="required", stream=True)
    chunks = list(required)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


def test_embeddings_equal_embed(client, server, minilm_dir):
    import maxjax

    texts = ["The quick brown fox jumps over the lazy dog.", "a cat", "Paris is the capital of France."]
    expected = maxjax.embed(texts, model=minilm_dir)
    got = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    vectors = np.array([d.embedding for d in got.data], np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    plain = httpx.post(f"{server[1]}/v1/embeddings", json={"model": "minilm", "input": texts[0],
                                                            "encoding_format": "float"}, timeout=60).json()
    cosine = float(np.dot(plain["data"][0]["embedding"], expected[0]) / np.linalg.norm(plain["data"][0]["embedding"]))
    assert cosine >= 0.99999 and plain["usage"]["prompt_tokens"] == 12


def test_speech_returns_24khz_wav(client):
    import soundfile

    audio = client.audio.speech.create(model="orpheus", voice="tara", input="Hello there.", response_format="wav",
                                       extra_body={"max_tokens": 42})
    samples, rate = soundfile.read(io.BytesIO(audio.content), dtype="float32")
    info = soundfile.info(io.BytesIO(audio.content))
    assert rate == 24000 and info.subtype == "PCM_16" and info.channels == 1
    assert samples.size > 0 and samples.size % 2048 == 0  # whole Orpheus frames of 2048 samples


BAD_REQUESTS = [
    ("completions", dict(model="smollm2", prompt="Hi", max_tokens=-1), "max_tokens"),
    ("completions", dict(model="smollm2", prompt="Hi", top_p=2), "top_p"),
    ("chat", dict(model="smollm2", messages=[]), "messages"),
    ("chat", dict(model="smollm2", messages=CHAT, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}),
     "response_format"),
    ("completions", dict(model="smollm2", prompt="word " * 300), "prompt"),
    ("chat", dict(model="smollm2", messages=[{"role": "user", "content": "word " * 300}]), "messages"),
    ("chat", dict(model="smollm2", messages=CHAT, tools=TOOLS), "tools"),
    ("completions", dict(model="smollm2", prompt="Hi", n=2), "n"),
    ("completions", dict(model="minilm", prompt="Hi"), "model"),
]


def test_bad_requests_get_400_naming_the_field(client, server):
    before = _metric(server[1], "maxjax_requests_total", model="-", status="rejected")
    for endpoint, body, field in BAD_REQUESTS:
        create = client.completions.create if endpoint == "completions" else client.chat.completions.create
        with pytest.raises(openai.BadRequestError) as info:
            create(**body)
        assert info.value.status_code == 400 and info.value.body["param"] == field, (body, info.value.body)
        assert info.value.body["type"] == "invalid_request_error" and info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:  # OpenAI's answer to an unknown model
        client.completions.create(model="nope", prompt="Hi")
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"
    assert _metric(server[1], "maxjax_requests_total", model="-", status="rejected") == before + len(BAD_REQUESTS) + 1
    ok = client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    assert _health(server[1])["smollm2"]["free_slots"] == RUNTIME["max_batch_size"]


def _mixed_request(i: int) -> tuple[str, dict]:
    """Sixteen different requests: chat or completion, greedy or seeded, lengths, stops, streaming."""
    kind = "chat" if i % 2 else "completions"
    body = dict(model="smollm2", max_tokens=4 + 3 * (i % 5), stream=i % 3 == 0)
    body.update(GREEDY if i % 4 < 2 else dict(temperature=0.5 + 0.1 * (i % 5), top_p=0.9, seed=100 + i))
    if i % 5 == 2:
        body["stop"] = [",", " and"]
    prompts = ["The three primary colors are", "Name a fruit.", "def fibonacci(n):", "What is 2 + 2?"]
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompts[i % 4]}]
    else:
        body["prompt"] = prompts[i % 4]
    return kind, body


def _send(client, kind: str, body: dict) -> tuple[str, str]:
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    out = create(**body)
    if body["stream"]:
        return _stream_text(out, kind), ""
    choice = out.choices[0]
    return (choice.message.content if kind == "chat" else choice.text), choice.finish_reason


def test_sixteen_concurrent_clients_equal_alone(client, server):
    requests = [_mixed_request(i) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: _send(client, *r), requests))
    alone = [_send(client, *r) for r in requests]
    assert together == alone
    assert len({text for text, _ in alone}) > 4  # the requests really differ
    health = _health(server[1])["smollm2"]
    assert health["free_slots"] == RUNTIME["max_batch_size"] and health["active"] == health["queued"] == 0


def test_disconnect_mid_stream_frees_the_slot(client, server):
    base = server[1]
    cancelled = _metric(base, "maxjax_requests_total", model="smollm2", status="cancelled")
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = 0
    for _ in stream:
        pieces += 1
        if pieces == 2:
            break
    stream.close()
    for _ in range(1200):  # a guard against a hang (~2 minutes), not a bound on how fast the cancel lands
        if _metric(base, "maxjax_requests_total", model="smollm2", status="cancelled") == cancelled + 1:
            break
        time.sleep(0.1)
    assert _metric(base, "maxjax_requests_total", model="smollm2", status="cancelled") == cancelled + 1
    health = _health(base)["smollm2"]
    assert health["free_slots"] == RUNTIME["max_batch_size"] and health["active"] == 0
    assert health["kv_pages_used"] == 0  # its pages came back
    assert "maxjax_time_to_first_token_seconds_bucket" in httpx.get(f"{base}/metrics").text


def test_models_list(client):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"smollm2", "minilm", "qwen-tools", "orpheus"}


def test_sigterm_drains_and_exits_zero(client, server):
    """Runs last: SIGTERM while a stream is open; the stream still ends properly and the process exits 0."""
    proc, _ = server
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=40, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert rest[-1].choices[0].finish_reason == "length" and text  # all 40 tokens: the drain let it finish
    assert proc.wait(timeout=600) == 0  # a guard against a hang, not a bound on the drain
