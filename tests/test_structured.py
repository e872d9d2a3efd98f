"""Structured JSON output on real SmolLM2 with llguidance: outputs parse and validate against the schema
(checked with ``jsonschema``, independent of llguidance); free rows in the same batch are unaffected;
invalid schemas fail at ``new_context``."""

import asyncio
import json

import pytest

from conftest import require

from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationInputs, TextGenerationRequest

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "role", "skills"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["engineer", "doctor", "teacher", "artist"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
}
PROMPTS = ["Describe a software engineer as JSON.", "Invent a doctor named Alice and give her details in JSON.",
           "Give me a JSON profile of a painter."]


@pytest.fixture(scope="module")
def pipe(smollm2_gguf):
    from maxjax.pipelines.registry import load_text_pipeline

    return load_text_pipeline(smollm2_gguf, max_batch_size=2, max_seq_len=256, length_buckets=(256,),
                              batch_buckets=(2,), max_num_steps=8)


def _request(rid, content, *, schema=None, **params):
    fmt = None if schema is None else {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    return TextGenerationRequest(request_id=rid, index=0, model_name="smollm2", response_format=fmt,
                                 messages=[{"role": "user", "content": content}],
                                 sampling_params=SamplingParams(**{"max_new_tokens": 100, **params}))


def _run(pipeline, contexts, num_steps=8):
    batch = {c.request_id: c for c in contexts}
    tokens = {rid: [] for rid in batch}
    while not all(c.is_done for c in batch.values()):
        for rid, out in pipeline.next_token(TextGenerationInputs(batch, num_steps=num_steps)).items():
            tokens[rid] += out.tokens
    for rid in batch:
        pipeline.release(rid)
    return tokens


def test_schema_outputs_parse_and_validate(pipe):
    jsonschema = require("jsonschema")
    tokenizer, pipeline = pipe
    contexts = [tokenizer.build_context(_request(f"{i}-{seed}", prompt, schema=SCHEMA, top_k=0, temperature=0.8,
                                                 seed=seed))
                for i, prompt in enumerate(PROMPTS) for seed in (1, 2)]
    texts = set()
    for pair in (contexts[0:2], contexts[2:4], contexts[4:6]):
        tokens = _run(pipeline, pair)
        for ctx in pair:
            assert ctx.status is GenerationStatus.END_OF_SEQUENCE, ctx  # the grammar finished, not the budget
            text = tokenizer.decode_tokens(tokens[ctx.request_id], skip_special_tokens=True)
            jsonschema.validate(json.loads(text), SCHEMA)
            texts.add(text)
    assert len(texts) > 1  # seeds and prompts matter


def test_json_object_output_parses(pipe):
    """Greedy, with room to finish: the grammar closes the object and ends the request."""
    tokenizer, pipeline = pipe
    request = TextGenerationRequest(request_id="obj", index=0, model_name="smollm2", prompt="A JSON object: ",
                                    response_format={"type": "json_object"},
                                    sampling_params=SamplingParams(max_new_tokens=200))
    ctx = tokenizer.build_context(request)
    tokens = _run(pipeline, [ctx])["obj"]
    assert ctx.status is GenerationStatus.END_OF_SEQUENCE, (ctx.status, tokenizer.decode_tokens(tokens))
    assert isinstance(json.loads(tokenizer.decode_tokens(tokens, skip_special_tokens=True)), dict)


def test_free_row_unaffected_by_constrained_neighbour(pipe):
    jsonschema = require("jsonschema")
    tokenizer, pipeline = pipe
    free = dict(top_k=0, temperature=1.0, seed=11, max_new_tokens=24)
    alone = _run(pipeline, [tokenizer.build_context(_request("free", "Tell me about cats.", **free))])["free"]
    constrained = tokenizer.build_context(_request("json", PROMPTS[0], schema=SCHEMA))
    together = _run(pipeline, [tokenizer.build_context(_request("free", "Tell me about cats.", **free)), constrained])
    assert len(alone) == 24
    assert together["free"] == alone
    assert constrained.status is GenerationStatus.END_OF_SEQUENCE  # and its neighbour's schema still holds
    jsonschema.validate(json.loads(tokenizer.decode_tokens(together["json"], skip_special_tokens=True)), SCHEMA)


@pytest.mark.parametrize("schema, message", [
    ({"type": "objekt"}, "Invalid type"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"$ref": "#/definitions/missing"}, "does not exist"),
    ("{not json", "not valid JSON"),
])
def test_invalid_schema_is_a_value_error_at_new_context(pipe, schema, message):
    tokenizer, _ = pipe
    request = TextGenerationRequest(request_id="bad", index=0, model_name="smollm2", prompt="hi",
                                    response_format={"type": "json_schema", "json_schema": schema})
    with pytest.raises(ValueError, match="json_schema") as info:
        asyncio.run(tokenizer.new_context(request))
    assert message in str(info.value)
