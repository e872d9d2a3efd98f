"""Speculative decoding on real SmolLM2: greedy output identical with and without speculation (n-gram drafts
and SmolLM2 drafting for itself, batch 1 and 4), and stop strings, eos, max_new_tokens and JSON-schema rows
exactly as without speculation. The reference is the same engine with speculation off."""

import dataclasses

import pytest

from maxjax.interfaces import SamplingParams, TextGenerationInputs, TextGenerationRequest
from maxjax.pipelines.drafters import DraftModelDrafter, NgramDrafter

pytestmark = pytest.mark.slow

CODE = "".join(f"def scale_{n}(values):\n    return [v * {n} for v in values]\n\n\n" for n in range(1, 4))
PROMPTS = {
    "rewrite": dict(messages=[{"role": "user", "content": "Repeat this sentence three times: the quick brown fox "
                                                          "jumps over the lazy dog."}]),
    "code": dict(prompt=CODE + "def scale_4(values):\n    return"),
    "chat": dict(messages=[{"role": "user", "content": "What is the capital of France?"}]),
    "raw": dict(prompt="The three primary colors are"),
}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}


@pytest.fixture(scope="module")
def pipe(smollm2_gguf):
    from maxjax.pipelines.registry import load_text_pipeline

    # scanned decode/verify layers: several times faster to compile, the same math
    return load_text_pipeline(smollm2_gguf, max_batch_size=4, max_seq_len=256, length_buckets=(256,),
                              batch_buckets=(4,), max_num_steps=8, scan_decode_layers=True, speculative="ngram",
                              num_speculative_tokens=4)


@pytest.fixture(scope="module")
def self_drafter(pipe, smollm2_gguf):
    from maxjax.pipelines.registry import load_draft_engine

    _, pipeline = pipe
    config = dataclasses.replace(pipeline.config, speculative="draft")
    return DraftModelDrafter(load_draft_engine(smollm2_gguf, pipeline.engine.model_config, config))


def generate(pipe, requests, drafter=None, num_steps=8):
    """{name: (tokens, final status, visible text or None)} for {name: request fields} (``max_new_tokens`` and
    ``sampling``: SamplingParams fields); drafter None: speculation off."""
    tokenizer, pipeline = pipe
    speculative = pipeline.speculative
    if drafter is not None:
        speculative.drafter = drafter
    pipeline.speculative = speculative if drafter is not None else None
    contexts = {}
    for name, fields in requests.items():
        fields = dict(fields)
        params = SamplingParams(max_new_tokens=fields.pop("max_new_tokens", 16), **fields.pop("sampling", {}))
        contexts[name] = tokenizer.build_context(TextGenerationRequest(name, 0, "smollm2", sampling_params=params,
                                                                       **PROMPTS[name], **fields))
    tokens = {n: [] for n in contexts}
    try:
        while not all(c.is_done for c in contexts.values()):
            live = {n: c for n, c in contexts.items() if not c.is_done}
            for n, out in pipeline.next_token(TextGenerationInputs(live, num_steps)).items():
                tokens[n] += out.tokens
        result = {}
        for n, ctx in contexts.items():
            checker = pipeline.stop_checker(n)
            result[n] = (tokens[n], ctx.status, None if checker is None else checker.visible_text)
            pipeline.release(n)
    finally:
        pipeline.speculative = speculative
    return result


def test_greedy_identical_with_speculation(pipe, self_drafter):
    everything = {name: {} for name in PROMPTS}
    reference = generate(pipe, everything)
    ngram = NgramDrafter()
    assert generate(pipe, everything, ngram) == reference  # batch 4
    stats = pipe[1].speculative.stats
    assert 0 < stats["accepted"] < stats["drafted"]  # accepted drafts and rejections, then decode goes on
    assert generate(pipe, {"rewrite": {}}, ngram, num_steps=5) == {"rewrite": reference["rewrite"]}  # batch 1
    assert generate(pipe, everything, self_drafter) == reference
    code = {"code": dict(max_new_tokens=10)}
    assert generate(pipe, code, self_drafter, num_steps=3)["code"][0] == reference["code"][0][:10]


def test_stops_eos_lengths_and_json_rows_as_without_speculation(pipe):
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    batches = [
        {"rewrite": dict(stop=["fox jumps"]),  # a stop string
         "chat": dict(max_new_tokens=30),  # eos ends the answer
         "code": dict(max_new_tokens=7),  # drafts longer than what is left
         "raw": dict(sampling=dict(repetition_penalty=1.2, min_new_tokens=10), max_new_tokens=16)},
        {"chat": dict(response_format=schema, max_new_tokens=30),  # no drafts: beside a drafting row
         "code": dict(stop=["* 4"], max_new_tokens=30)},
    ]
    for requests in batches:
        expected = generate(pipe, requests)
        assert generate(pipe, requests, NgramDrafter()) == expected
    assert expected["code"][2].rstrip().endswith("[v") and expected["chat"][1].name == "END_OF_SEQUENCE"
