"""OpenAI request bodies -> protocol requests, and `--model` specs, without a model or a device."""

import json

import pytest

from conftest import require

require("pydantic")

from maxjax.interfaces import PipelineTask  # noqa: E402
from maxjax.server.models import parse_model_spec, task_of  # noqa: E402
from maxjax.server.openai_protocol import ChatCompletionRequest, CompletionRequest, InvalidRequest  # noqa: E402

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_sampling_follows_openai():
    greedy = CompletionRequest(model="m", prompt="hi", temperature=0).to_requests("r")[0].sampling_params
    assert (greedy.top_k, greedy.temperature, greedy.max_new_tokens) == (1, 1.0, 16)
    sampled = CompletionRequest(model="m", prompt="hi", temperature=0.7, top_p=0.9, seed=3, top_k=40)
    params = sampled.to_requests("r")[0].sampling_params
    assert (params.top_k, params.temperature, params.top_p, params.seed) == (40, 0.7, 0.9, 3)
    unseeded = [CompletionRequest(model="m", prompt="hi").to_requests("r")[0].sampling_params.seed for _ in range(4)]
    assert len(set(unseeded)) > 1 and all(s >= 0 for s in unseeded)


def test_prompts_become_one_request_each():
    requests = CompletionRequest(model="m", prompt=[[1, 2], [3]], logprobs=2, echo=True).to_requests("r")
    assert [r.prompt for r in requests] == [[1, 2], [3]] and [r.request_id for r in requests] == ["r-0", "r-1"]
    assert requests[0].logprobs == 2 and requests[0].echo
    assert len(CompletionRequest(model="m", prompt=[5, 6]).to_requests("r")) == 1


def test_chat_fields():
    body = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "2"}], logprobs=True, max_completion_tokens=5)
    request = body.to_request("r")
    assert request.messages[0]["role"] == "system"
    assert request.messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}  # templates want objects
    assert request.logprobs == 1 and request.sampling_params.max_new_tokens == 5
    forced = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[TOOL],
                                   tool_choice={"type": "function", "function": {"name": "f"}}).to_request("r")
    assert forced.response_format["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.parametrize("body, param", [
    (dict(n=2), "n"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(response_format={"type": "json_schema"}), "response_format"),
    (dict(min_tokens=9, max_tokens=3), "min_tokens"),
])
def test_invalid_fields_are_named(body, param):
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **body).to_request("r")
    assert info.value.param == param


def test_model_specs(tmp_path):
    assert parse_model_spec("chat=/x/SmolLM2.Q4_1.gguf") == ("chat", "/x/SmolLM2.Q4_1.gguf")
    assert parse_model_spec("/x/SmolLM2.gguf") == ("SmolLM2", "/x/SmolLM2.gguf")
    assert parse_model_spec(None)[1] is None
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "tts" / "snac").mkdir(parents=True)
    (tmp_path / "tts" / "snac" / "config.json").write_text("{}")
    assert task_of(str(tmp_path / "bert")) is PipelineTask.EMBEDDINGS_GENERATION
    assert task_of(str(tmp_path / "tts")) is PipelineTask.AUDIO_GENERATION
    assert task_of("random-orpheus") is PipelineTask.AUDIO_GENERATION
    assert task_of("model.gguf") is PipelineTask.TEXT_GENERATION
