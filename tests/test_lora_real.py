"""LoRA on the real SmolLM2-135M: maxjax vs HF transformers + PEFT, on the same GGUF weights and adapter files.

Three PEFT adapters with random non-zero B on different target sets, ranks and scalings (one rsLoRA) are
served at once; one batch mixes them with a base-model row. Logits must match HF+PEFT row by row within the
float32 bound of the base model (tests/test_llama_real.py), and greedy tokens must equal HF+PEFT `generate`.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.architectures import llama
from maxjax.interfaces import SamplingParams, TextGenerationRequest
from maxjax.pipelines.llm import LLM

pytestmark = pytest.mark.slow

FLOAT32_TOLERANCE = 2e-4  # the base model's bound vs transformers
# name -> (target modules, rank, lora_alpha, use_rslora)
ADAPTERS = {
    "qv": (["q_proj", "v_proj"], 8, 16, False),
    "attn": (["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8, True),
    "mlp": (["gate_proj", "up_proj", "down_proj"], 16, 32, False),
}
ROWS = [(None, "The three primary colors are"),
        ("qv", "The three primary colors are"),
        ("attn", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        ("mlp", "def fibonacci(n):\n    if n < 2:\n        return n\n    return")]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def hf_peft(hf_smollm2, tmp_path_factory, add_random_lora):
    """The shared HF reference with the three adapters (saved under folder/name); unwrapped again afterwards."""
    folder = tmp_path_factory.mktemp("smollm2-lora")
    model = hf_smollm2
    try:
        for seed, (name, (targets, r, alpha, rslora)) in enumerate(ADAPTERS.items()):
            model = add_random_lora(model, folder, name, targets, r, alpha, rslora=rslora, seed=seed, std=0.05)
        yield model, folder
    finally:
        if model is not hf_smollm2:
            model.unload()  # puts the original linear layers back into hf_smollm2


@pytest.fixture(scope="module")
def served(smollm2_gguf, hf_peft):
    """(tokenizer, pipeline, LLM) with the three adapters; scanned decode layers compile in seconds."""
    _, folder = hf_peft
    llm = LLM(smollm2_gguf, chat=False, lora_adapters={name: folder / name for name in ADAPTERS}, max_batch_size=4,
              batch_buckets=(4,), max_seq_len=128, length_buckets=(128,), max_num_steps=8, scan_decode_layers=True)
    return llm.tokenizer, llm.pipeline, llm


def hf_run(model, name, fn):
    """``fn()`` with adapter ``name`` active on the PeftModel (None: adapters disabled, the base model)."""
    if name is None:
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def test_logits_match_hf_peft_in_one_mixed_batch(served, hf_peft):
    import torch

    model, _ = hf_peft
    tokenizer, pipeline, _ = served
    engine = pipeline.engine
    ids = [list(map(int, tokenizer.encode_text(prompt))) for _, prompt in ROWS]
    tokens = np.zeros((len(ROWS), 64), np.int32)
    positions = np.full((len(ROWS), 64), -1, np.int32)
    for b, row in enumerate(ids):
        tokens[b, :len(row)], positions[b, :len(row)] = row, np.arange(len(row))
    index = jnp.asarray([engine.lora_slot(name) for name, _ in ROWS], jnp.int32)
    cache = llama.init_kv_cache(engine.model_config, len(ROWS), 64)
    hidden, _ = llama.forward_hidden(engine.params, engine.model_config, tokens, positions, cache,
                                     jnp.arange(len(ROWS)), kv_len=64, scan=True, lora_index=index)
    got = np.asarray(llama.lm_head(engine.params, engine.model_config, hidden))
    worst = {}
    for b, ((name, _), row) in enumerate(zip(ROWS, ids)):
        with torch.no_grad():
            ref = hf_run(model, name, lambda: model(torch.tensor([row])).logits[0].numpy())
            if name is not None:  # the adapter really changes the model
                base = hf_run(model, None, lambda: model(torch.tensor([row])).logits[0].numpy())
                assert np.abs(ref - base).max() > 1.0
        worst[name] = float(np.abs(got[b, :len(row)] - ref).max())
        np.testing.assert_array_equal(got[b, :len(row)].argmax(-1), ref.argmax(-1))
    print(f"max abs logit diff vs HF+PEFT per adapter: {worst}")
    assert max(worst.values()) <= FLOAT32_TOLERANCE


def test_greedy_tokens_match_hf_peft_generate(served, hf_peft, run_requests):
    import torch

    model, _ = hf_peft
    tokenizer, pipeline, llm = served
    requests = [TextGenerationRequest(f"r{i}", 0, "smollm2", prompt=prompt, lora_name=name,
                                      sampling_params=SamplingParams(max_new_tokens=NEW_TOKENS))
                for i, (name, prompt) in enumerate(ROWS)]
    contexts = {r.request_id: tokenizer.build_context(r) for r in requests}
    got = run_requests(pipeline, contexts)

    def hf_greedy(name, ids):
        with torch.no_grad():
            out = hf_run(model, name, lambda: model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                                             do_sample=False, eos_token_id=2, pad_token_id=2))
        tokens = out[0, len(ids):].tolist()
        return tokens[:tokens.index(2)] if 2 in tokens else tokens  # eos is not returned

    for request in requests:
        expected = hf_greedy(request.lora_name, contexts[request.request_id].prompt_tokens.tolist())
        assert got[request.request_id] == expected, request.lora_name
        print(f"{request.lora_name}: {tokenizer.decode_tokens(expected)!r}")
    assert got["r0"] != got["r1"]  # same prompt, base model vs adapter
    assert llm.generate(ROWS[1][1], SamplingParams(max_new_tokens=NEW_TOKENS), lora_name="qv") == (
        tokenizer.decode_tokens(got["r1"], skip_special_tokens=True))  # the LLM wrapper takes lora_name per call
