"""The max.interfaces surface: names, signatures and defaults as MAX documents them, and validation."""

import dataclasses
import inspect
import math
import subprocess
import sys

import numpy as np
import pytest

import maxjax.interfaces as I
from maxjax.interfaces import (
    AudioGenerationMetadata,
    AudioGenerationRequest,
    AudioGenerationResponse,
    AudioGeneratorOutput,
    EmbeddingsOutput,
    GenerationStatus,
    LogProbabilities,
    PipelineTask,
    SamplingParams,
    SchedulerResult,
    SchedulerStatus,
    TextGenerationInputs,
    TextGenerationOutput,
    TextGenerationRequest,
)

_ = inspect.Parameter.empty  # a required parameter

# (name, constructor parameters in order with their defaults) as MAX's documentation lists them.
SIGNATURES = [
    ("SamplingParams", [("top_k", 1), ("top_p", 1), ("min_p", 0.0), ("temperature", 1),
                        ("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0),
                        ("max_new_tokens", None), ("min_new_tokens", 0), ("ignore_eos", False), ("stop", None),
                        ("stop_token_ids", None), ("detokenize", True), ("seed", 0)]),
    ("TextGenerationRequest", [("request_id", _), ("index", _), ("model_name", _), ("lora_name", None),
                               ("prompt", None), ("messages", None), ("images", None), ("tools", None),
                               ("response_format", None), ("timestamp_ns", 0), ("request_path", "/"),
                               ("logprobs", 0), ("echo", False), ("stop", None), ("chat_template_options", None),
                               ("sampling_params", "factory")]),
    ("AudioGenerationRequest", [("request_id", _), ("index", _), ("model", _), ("lora", None), ("input", None),
                                ("audio_prompt_tokens", "factory"), ("audio_prompt_transcription", ""),
                                ("sampling_params", "factory"), ("_assistant_message_override", None),
                                ("prompt", None), ("streaming", True), ("buffer_speech_tokens", None)]),
    ("AudioGenerationResponse", [("final_status", _), ("audio", None), ("buffer_speech_tokens", None)]),
    ("AudioGeneratorOutput", [("audio_data", _), ("metadata", _), ("is_done", _), ("buffer_speech_tokens", None)]),
    ("EmbeddingsOutput", [("embeddings", _)]),
    ("LogProbabilities", [("token_log_probabilities", _), ("top_log_probabilities", _)]),
    ("TextGenerationOutput", [("request_id", _), ("tokens", _), ("final_status", _), ("log_probabilities", None)]),
    ("TextGenerationInputs", [("batch", _), ("num_steps", _)]),
    ("SchedulerResult", [("status", _), ("result", None)]),
    ("SharedMemoryArray", [("name", _), ("shape", _), ("dtype", _)]),
    ("Request", [("request_id", _)]),
    ("AudioGenerationMetadata", [(n, None) for n in (
        "sample_rate", "duration", "chunk_id", "timestamp", "final_chunk", "model_name", "request_id",
        "tokens_generated", "processing_time", "echo")]),
]

SEED_NAMES = [
    "AudioGenerationMetadata", "AudioGenerationRequest", "AudioGenerationResponse", "AudioGenerator",
    "AudioGeneratorOutput", "EmbeddingsGenerator", "EmbeddingsOutput", "GenerationStatus", "InputContext",
    "LogProbabilities", "PipelineOutput", "PipelineTask", "PipelineTokenizer", "Request", "RequestID",
    "SamplingParams", "SchedulerResult", "SchedulerStatus", "SharedMemoryArray", "TextGenerationInputs",
    "TextGenerationOutput", "TextGenerationRequest", "TextGenerationRequestFunction", "TextGenerationRequestMessage",
    "TextGenerationRequestTool", "TextGenerationResponseFormat", "TokenGenerator",
]


def test_every_seed_name_is_exported():
    assert sorted(I.__all__) == sorted(SEED_NAMES)
    for name in SEED_NAMES:
        assert getattr(I, name) is not None
    assert I.RequestID is str


@pytest.mark.parametrize("name,params", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_constructor_signature_matches_seed(name, params):
    cls = getattr(I, name)
    got = [(f.name, f) for f in dataclasses.fields(cls)]
    assert [n for n, _f in got] == [n for n, _d in params]
    for (field_name, f), (_n, default) in zip(got, params):
        if default == "factory":
            assert f.default_factory is not dataclasses.MISSING, field_name
        elif default is _:
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, field_name
        else:
            assert f.default == default and type(f.default) is type(default), field_name


def test_metadata_is_keyword_only_and_to_dict_drops_unset():
    with pytest.raises(TypeError):
        AudioGenerationMetadata(24000)  # type: ignore[misc]
    meta = AudioGenerationMetadata(sample_rate=24000, final_chunk=False, chunk_id=0)
    assert meta.to_dict() == {"sample_rate": 24000, "chunk_id": 0, "final_chunk": False}


def test_request_defaults_are_default_sampling_params():
    req = TextGenerationRequest("r", 0, "m", prompt="hi")
    assert req.sampling_params == SamplingParams()
    assert AudioGenerationRequest("r", 0, "m").audio_prompt_tokens == []


@pytest.mark.parametrize("status,done", [(GenerationStatus.ACTIVE, False), (GenerationStatus.END_OF_SEQUENCE, True),
                                         (GenerationStatus.MAXIMUM_LENGTH, True)])
def test_status_is_done(status, done):
    assert status.is_done is done
    assert TextGenerationOutput("r", [1], status).is_done is done
    assert AudioGenerationResponse(status).is_done is done
    assert isinstance(status, str) and status == status.value


def test_enum_values():
    assert [s.value for s in GenerationStatus] == ["active", "end_of_sequence", "maximum_length"]
    assert [s.value for s in SchedulerStatus] == ["active", "cancelled", "complete"]
    assert {t.value for t in PipelineTask} == {"text_generation", "embeddings_generation", "audio_generation",
                                               "speech_token_generation"}


@pytest.mark.parametrize("task,output", [
    (PipelineTask.TEXT_GENERATION, TextGenerationOutput), (PipelineTask.EMBEDDINGS_GENERATION, EmbeddingsOutput),
    (PipelineTask.AUDIO_GENERATION, AudioGeneratorOutput), (PipelineTask.SPEECH_TOKEN_GENERATION, TextGenerationOutput),
])
def test_task_output_type(task, output):
    assert task.output_type is output


def test_scheduler_result():
    out = TextGenerationOutput("r", [1], GenerationStatus.ACTIVE)
    active, done, cancelled = SchedulerResult.active(out), SchedulerResult.complete(out), SchedulerResult.cancelled()
    assert (active.status, active.result, active.stop_stream) == (SchedulerStatus.ACTIVE, out, False)
    assert (done.status, done.result, done.stop_stream) == (SchedulerStatus.COMPLETE, out, True)
    assert (cancelled.status, cancelled.result, cancelled.stop_stream) == (SchedulerStatus.CANCELLED, None, True)


def test_audio_response_and_embeddings():
    empty = AudioGenerationResponse(GenerationStatus.ACTIVE)
    assert not empty.has_audio_data
    with pytest.raises(AssertionError):
        _ = empty.audio_data
    audio = np.zeros(4, np.float32)
    assert AudioGenerationResponse(GenerationStatus.END_OF_SEQUENCE, audio=audio).audio_data is audio
    assert EmbeddingsOutput(np.ones(3)).is_done is True


# (kwargs, field named in the error)
BAD_SAMPLING = [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.01}, "min_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"), ({"presence_penalty": math.inf}, "presence_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"), ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
    ({"seed": -1}, "seed"), ({"seed": 1.0}, "seed"), ({"seed": "7"}, "seed"),
    ({"stop": 3}, "stop"), ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"), ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
]


@pytest.mark.parametrize("kwargs,field", BAD_SAMPLING, ids=[f"{k}" for k, _f in BAD_SAMPLING])
def test_sampling_params_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"top_p": 1e-6}, {"min_p": 1.0}, {"temperature": 0.0}, {"top_k": 0}, {"max_new_tokens": 1, "min_new_tokens": 1},
    {"stop": "###"}, {"stop": ["a", "b"]}, {"stop_token_ids": [0, np.int64(5)]}, {"seed": np.int32(3)},
    {"frequency_penalty": -2.0, "presence_penalty": 2.0},
])
def test_sampling_params_accepts(kwargs):
    SamplingParams(**kwargs)


def test_stop_strings_normalised():
    assert SamplingParams(stop="x").stop_strings == ["x"]
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert SamplingParams().stop_strings == []


def test_request_validation():
    with pytest.raises(ValueError, match="logprobs"):
        TextGenerationRequest("r", 0, "m", prompt="x", logprobs=-1)
    with pytest.raises(ValueError, match="input"):
        AudioGenerationRequest("r", 0, "m", input="a" * 4097)
    AudioGenerationRequest("r", 0, "m", input="a" * 4096)
    with pytest.raises(ValueError, match="num_steps"):
        TextGenerationInputs(batch={}, num_steps=0)


class _Generator:
    def next_token(self, inputs):
        return {}

    def release(self, request_id):
        pass


class _Embedder:
    def encode(self, batch):
        return {}


class _Speaker:
    decoder_sample_rate = 24000
    prev_num_steps = 0

    def next_chunk(self, batch):
        return {}

    def release(self, context):
        pass


class _Tokenizer:
    eos = 2
    expects_content_wrapping = False

    async def new_context(self, request):
        return None

    async def encode(self, prompt, add_special_tokens=False):
        return np.zeros(1)

    async def decode(self, encoded, **kwargs):
        return ""


@pytest.mark.parametrize("protocol,good", [
    (I.TokenGenerator, _Generator), (I.EmbeddingsGenerator, _Embedder), (I.AudioGenerator, _Speaker),
    (I.PipelineTokenizer, _Tokenizer),
])
def test_protocol_conformance(protocol, good):
    assert isinstance(good(), protocol)
    assert not isinstance(object(), protocol)
    assert isinstance(_Embedder(), I.TokenGenerator) is False


def test_pipeline_output_protocol():
    for out in (TextGenerationOutput("r", [], GenerationStatus.ACTIVE), EmbeddingsOutput(np.ones(2)),
                AudioGenerationResponse(GenerationStatus.ACTIVE),
                AudioGeneratorOutput(np.ones(2), AudioGenerationMetadata(), True)):
        assert isinstance(out, I.PipelineOutput)
    assert not isinstance(LogProbabilities([], []), I.PipelineOutput)


def test_interfaces_import_no_jax():
    code = "import sys, maxjax.interfaces; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
