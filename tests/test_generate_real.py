"""Greedy generation on the real SmolLM2 through the public protocol equals HF transformers' `generate`."""

import pytest

from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationInputs, TextGenerationRequest

pytestmark = pytest.mark.slow

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def text_pipeline(smollm2_gguf):
    from maxjax.pipelines.registry import load_text_pipeline

    return load_text_pipeline(str(smollm2_gguf), max_batch_size=4, max_seq_len=256, length_buckets=(128, 256),
                              max_num_steps=8)


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm2):
    import torch

    model = hf_smollm2
    done = {}  # prompt -> tokens: both num_steps cases compare with the same HF generations

    def generate(prompt_ids):
        key = tuple(prompt_ids)
        if key not in done:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=2)
            tokens = out[0, len(prompt_ids):].tolist()
            done[key] = tokens[:tokens.index(2)] if 2 in tokens else tokens  # eos is not returned by maxjax
        return list(done[key])

    return generate


def requests():
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    out = [TextGenerationRequest(f"p{i}", i, "smollm2", prompt=p, sampling_params=params)
           for i, p in enumerate(PROMPTS)]
    out.append(TextGenerationRequest("chat", len(PROMPTS), "smollm2", messages=CHAT, sampling_params=params))
    return out


@pytest.mark.parametrize("num_steps", [1, 8])
def test_batched_greedy_equals_hf_generate(text_pipeline, hf_greedy, num_steps):
    tokenizer, pipeline = text_pipeline
    contexts = {r.request_id: tokenizer.build_context(r) for r in requests()}
    prompts = {rid: ctx.prompt_tokens.tolist() for rid, ctx in contexts.items()}
    assert len({len(p) for p in prompts.values()}) == len(prompts)  # unequal lengths in one batch
    tokens = {rid: [] for rid in contexts}
    status = {}
    live = dict(contexts)
    while live:
        for rid, out in pipeline.next_token(TextGenerationInputs(dict(live), num_steps)).items():
            assert len(out.tokens) <= num_steps
            tokens[rid] += out.tokens
            if out.is_done:
                status[rid] = out.final_status
                pipeline.release(rid)
                del live[rid]
    for rid, prompt in prompts.items():
        expected = hf_greedy(prompt)
        assert tokens[rid] == expected, (rid, tokenizer.decode_tokens(tokens[rid]), tokenizer.decode_tokens(expected))
        want = GenerationStatus.MAXIMUM_LENGTH if len(expected) == NEW_TOKENS else GenerationStatus.END_OF_SEQUENCE
        assert status[rid] == want
    assert tokenizer.decode_tokens(tokens["chat"]) == "The capital of France is Paris."
    assert pipeline.slots.num_free == pipeline.config.max_batch_size
