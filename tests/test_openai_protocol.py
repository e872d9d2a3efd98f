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


def test_built_in_names_serve_under_their_own_name(tmp_path):
    from maxjax.server.models import plan_models

    assert parse_model_spec(None) == ("smollm2", None)  # a plain `maxjax serve`
    assert parse_model_spec("smollm2") == ("smollm2", "smollm2")
    assert parse_model_spec("minilm") == ("minilm", "minilm")
    assert parse_model_spec("tts=random-orpheus") == ("tts", "random-orpheus")
    assert task_of("minilm") is PipelineTask.EMBEDDINGS_GENERATION
    assert task_of("smollm2") is PipelineTask.TEXT_GENERATION
    plans = plan_models(["minilm", "chat=smollm2"], {"a": "/adapters/a"})
    assert [(p.name, p.task, p.lora_adapters) for p in plans] == [
        ("minilm", PipelineTask.EMBEDDINGS_GENERATION, {}),
        ("chat", PipelineTask.TEXT_GENERATION, {"a": "/adapters/a"})]
    with pytest.raises(ValueError, match="smollm2"):
        plan_models(["smollm2", "smollm2"])
    with pytest.raises(ValueError, match=r"\['chat'\]"):  # models and adapters share the names
        plan_models(["chat=smollm2"], {"chat": "/x"})
    with pytest.raises(ValueError, match="--lora"):
        plan_models(["minilm"], {"a": "/x"})


@pytest.mark.parametrize("cls, body", [
    (CompletionRequest, dict(prompt="x", temprature=0.5)),
    (ChatCompletionRequest, dict(messages=[{"role": "user", "content": "x"}], max_token=3)),
    (ChatCompletionRequest, dict(messages=[{"role": "user", "content": "x"}],
                                 tools=[{"type": "function", "function": {"name": "f", "parameter": {}}}])),
])
def test_unknown_fields_are_refused(cls, body):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="extra_forbidden|Extra inputs"):
        cls(model="m", **body)


def test_extensions_and_response_format_on_completions():
    body = CompletionRequest(model="m", prompt="x", top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=1,
                             ignore_eos=True, stop_token_ids=[3], user="u",
                             response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}})
    request = body.to_requests("r", lora_name="a")[0]
    assert request.response_format == {"type": "json_schema", "json_schema": {"name": "output",
                                                                              "schema": {"type": "object"}}}
    assert request.lora_name == "a" and request.sampling_params.top_k == 5


# ---- the app while its models load (no model, no device) --------------------------------------------------------

@pytest.fixture
def loading_app():
    from fastapi.testclient import TestClient

    from maxjax.server.app import create_app
    from maxjax.server.metrics import Metrics
    from maxjax.server.models import ServedModels, plan_models

    models = ServedModels(plan_models(["smollm2", "minilm"], {"pirate": "/adapters/pirate"}))
    with TestClient(create_app(models, Metrics())) as client:
        yield client, models


def test_health_is_503_loading_until_every_model_is_ready(loading_app):
    client, models = loading_app
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert health.json()["models"]["smollm2"] == {"task": "text_generation", "status": "loading"}
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(listed) == {"smollm2", "minilm", "pirate"} and listed["pirate"]["parent"] == "smollm2"
    assert not any(m["ready"] for m in listed.values())
    busy = client.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi"})
    assert busy.status_code == 503 and "still loading" in busy.json()["error"]["message"]
    models.error = "RuntimeError: out of memory"
    failed = client.get("/health")
    assert failed.status_code == 503 and failed.json()["status"] == "failed" and "out of memory" in failed.text


def test_unknown_model_is_404_model_not_found(loading_app):
    client, _ = loading_app
    response = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user",
                                                                                          "content": "Hi"}]})
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "gpt-4" in error["message"]
    wrong_task = client.post("/v1/embeddings", json={"model": "smollm2", "input": "Hi"})
    assert wrong_task.status_code == 400 and wrong_task.json()["error"]["param"] == "model"


def test_malformed_json_says_where(loading_app):
    client, _ = loading_app
    response = client.post("/v1/completions", content=b'{"model": "smollm2",\n "prompt": "Hi" "max_tokens": 4}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None and error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"] and "line 2 column 17" in error["message"]  # as json.loads counts


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "temprature": 0.5}, "temprature"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                              "max_token": 3}, "max_token"),
    ("/v1/embeddings", {"model": "minilm", "input": "Hi", "normalize": True}, "normalize"),
    ("/v1/audio/speech", {"model": "tts", "input": "Hi", "pitch": 2}, "pitch"),
])
def test_unknown_fields_get_400_naming_them(loading_app, route, body, field):
    client, _ = loading_app
    response = client.post(route, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and "top_k" in error["message"]
