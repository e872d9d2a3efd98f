"""SmolLM2-135M-Instruct (Q4_1 GGUF): logits and greedy decoding vs transformers on the same file; the store.

transformers dequantizes the same GGUF to float32, so both sides run identical weights. In float64 both
compute the same math (logits agree to ~1e-6; what is left is numpy's and torch's float32 `pow` rounding
five of the 32 rope inverse frequencies one ulp apart). In float32 the gap is summation order: against a
true float64 run, transformers' logits are off by 4e-5..9e-5 and maxjax's by 6e-5..1.5e-4, because XLA
CPU's matmul kernel (YNNPACK) rounds ~1.5x more than torch's sgemm per layer; so maxjax vs transformers
float32 measures up to 1.4e-4 on these prompts (9.8e-5 with that kernel disabled, at 10-30% lower decode
speed, or with split-K matmuls, 2.5x slower on XLA CPU).
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.architectures import llama
from maxjax.models import load_model
from maxjax.weights import convert_to_store
from maxjax.weights.gguf_file import load_gguf

pytestmark = pytest.mark.slow

PROMPTS = [
    "The three primary colors are",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Apollo 11 landed on the Moon. The astronauts Neil Armstrong and Buzz Aldrin spent about "
    "two and a half hours outside the lunar module, collecting samples and setting up experiments.",
]
FLOAT32_TOLERANCE = 2e-4  # measured 1.41e-4 worst (prompt 0 in the padded batch)
# Batched and single-sequence logits come from programs of different shapes, whose matmul kernels sum in
# different orders: each is a float32 rounding of the same float64 logits, off by up to 1.5e-4 (module
# docstring), so the two may differ by up to twice that (1.1e-4 seen on one machine, 5 of 245 760 logits
# over 1e-4). Padding bugs are caught at 1e-5 by tests/test_llama.py's tiny-model batching test.
BATCH_TOLERANCE = 2 * 1.5e-4
FLOAT64_TOLERANCE = 1e-5  # measured 2.7e-6 (logits), 1.8e-6 (final hidden states)


@pytest.fixture(scope="module")
def reference(hf_smollm2):
    import torch

    model = hf_smollm2

    def logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    return model, logits


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def prompt_ids(ours):
    return [list(map(int, ours.tokenizer.encode_text(p))) for p in PROMPTS]


def test_float32_logits_match_transformers(ours, reference, prompt_ids):
    _, ref_logits = reference
    batch = ours.logits(prompt_ids)  # one batch of unequal lengths, right-padded
    worst = batch_gap = 0.0
    for b, ids in enumerate(prompt_ids):
        ref = ref_logits(ids)
        alone = ours.logits([ids])[0]
        for got in (alone, batch[b, : len(ids)]):
            worst = max(worst, float(np.abs(got - ref).max()))
            np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
        batch_gap = max(batch_gap, float(np.abs(batch[b, : len(ids)] - alone).max()))
    print(f"float32 max abs logit diff vs transformers: {worst:.2e}; batched vs single: {batch_gap:.2e}")
    assert worst <= FLOAT32_TOLERANCE
    assert batch_gap <= BATCH_TOLERANCE


def test_float64_math_matches_transformers(smollm2_gguf, hf_smollm2, prompt_ids, monkeypatch):
    """Run both sides in float64 so rounding vanishes and any real difference in the math (eps, rope, Q/K
    un-permutation, tied head, dequantization) shows; both keep rope angles in float32, as HF does."""
    import torch
    from transformers.models.llama import modeling_llama

    def rms_norm_float64(self, hidden):  # HF's RMSNorm computes in float32 even for a float64 model
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_float64)
    model = copy.deepcopy(hf_smollm2).to(torch.float64)
    cfg, params, _ = load_gguf(smollm2_gguf)
    embed = params["embed"].astype(np.float64)  # [V, D]
    worst_hidden = worst_logits = 0.0
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        hidden_fn = jax.jit(functools.partial(llama.forward_hidden, cfg=cfg, kv_len=64))
        for ids in prompt_ids:
            tokens = np.zeros((1, 64), np.int32)
            positions = np.full((1, 64), -1, np.int32)
            tokens[0, : len(ids)], positions[0, : len(ids)] = ids, np.arange(len(ids))
            hidden, _ = hidden_fn(params64, tokens=tokens, positions=positions,
                                  cache=llama.init_kv_cache(cfg, 1, 64, jnp.float64), pages=np.zeros(1, np.int32))
            hidden = np.asarray(hidden)[0, : len(ids)]  # [T, D] float64, final-normed
            assert hidden.dtype == np.float64
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            worst_hidden = max(worst_hidden, float(np.abs(hidden - out.hidden_states[-1][0].numpy()).max()))
            worst_logits = max(worst_logits, float(np.abs(hidden @ embed.T - out.logits[0].numpy()).max()))
    print(f"float64 max abs diff vs transformers: hidden {worst_hidden:.1e}, logits {worst_logits:.1e}")
    assert worst_hidden <= FLOAT64_TOLERANCE and worst_logits <= FLOAT64_TOLERANCE


def test_bfloat16_tracks_transformers(smollm2_gguf, reference, prompt_ids):
    _, ref_logits = reference
    model16 = load_model(smollm2_gguf, dtype="bfloat16", tokenizer=False)
    assert model16.params["embed"].dtype == jnp.bfloat16
    got = model16.logits(prompt_ids)
    agree, total, worst = 0, 0, 0.0
    for b, ids in enumerate(prompt_ids):
        ref = ref_logits(ids)
        agree += int((got[b, : len(ids)].argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(got[b, : len(ids)] - ref).max()))
    print(f"bfloat16: argmax agreement {agree}/{total}, max abs logit diff {worst:.3f}")
    assert agree / total >= 0.85 and worst < 3.0


def test_greedy_decode_through_cache_matches_transformers(ours, reference, prompt_ids):
    import torch

    model, _ = reference
    ids = prompt_ids[0]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    cfg = ours.config
    step = jax.jit(functools.partial(llama.forward, cfg=cfg, kv_len=64), donate_argnames=("cache",))
    cache = llama.init_kv_cache(cfg, 2, 64)
    slot = np.array([1], np.int32)  # a non-zero slot, with a padded prefill bucket
    tokens = np.zeros((1, 16), np.int32)
    positions = np.full((1, 16), -1, np.int32)
    tokens[0, : len(ids)], positions[0, : len(ids)] = ids, np.arange(len(ids))
    logits, cache = step(ours.params, tokens=tokens, positions=positions, cache=cache, pages=slot)
    generated = [int(np.asarray(logits)[0, len(ids) - 1].argmax())]
    for position in range(len(ids), len(ids) + 15):
        logits, cache = step(ours.params, tokens=np.array([[generated[-1]]], np.int32),
                             positions=np.array([[position]], np.int32), cache=cache, pages=slot)
        generated.append(int(np.asarray(logits)[0, 0].argmax()))
    assert generated == expected
    assert ours.tokenizer.decode_tokens(generated).startswith(" the primary colors of the RGB color model")


def test_store_loads_without_reading_the_gguf_with_identical_logits(smollm2_gguf, tmp_path, ours, prompt_ids,
                                                                    monkeypatch):
    """A store load is a checkpoint restore: it opens no GGUF file (no parse, no dequantization) and gives the
    GGUF's config, logits and tokenizer."""
    import gguf

    store = convert_to_store(smollm2_gguf, "smollm2-test", models_dir=tmp_path)
    opened = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *args, **kwargs: opened.append(path) or reader(path, *args,
                                                                                                         **kwargs))
    from_gguf = load_model(smollm2_gguf)
    assert opened, "the GGUF load was not seen"
    opened.clear()
    from_store = load_model(store)
    assert opened == []
    assert from_store.config == from_gguf.config
    np.testing.assert_array_equal(from_store.logits(prompt_ids[:2]), from_gguf.logits(prompt_ids[:2]))
    assert list(from_store.tokenizer.encode_text(PROMPTS[1])) == prompt_ids[1]


EXACT_MATMUL_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="  # XLA CPU's plain dot kernels (README)


def test_float32_logits_closer_with_plain_cpu_matmuls(smollm2_gguf, ours, reference, prompt_ids, tmp_path):
    """With XLA CPU's YNNPACK matmul fusion off (set before JAX starts, so in a child process) the float32
    logits are closer to transformers' than with it (measured 9.8e-5 vs 1.4e-4; a fixed bound of 1e-4 sat
    at the edge of that one measurement, so the test compares the two runs instead)."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, sys, numpy as np\n"
              "from maxjax.models import load_model\n"
              "model = load_model(sys.argv[1])\n"
              "for i, ids in enumerate(json.loads(sys.argv[2])):\n"
              "    np.save(f'{sys.argv[3]}/{i}.npy', model.logits([ids])[0])\n")
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {EXACT_MATMUL_FLAGS}".strip())
    subprocess.run([sys.executable, "-c", script, str(smollm2_gguf), json.dumps(prompt_ids), str(tmp_path)],
                   env=env, check=True, timeout=600)
    _, ref_logits = reference
    worst = max(float(np.abs(np.load(tmp_path / f"{i}.npy") - ref_logits(ids)).max())
                for i, ids in enumerate(prompt_ids))
    default = max(float(np.abs(ours.logits([ids])[0] - ref_logits(ids)).max()) for ids in prompt_ids)
    print(f"float32 max abs logit diff vs transformers: plain matmuls {worst:.2e}, default {default:.2e}")
    assert worst <= FLOAT32_TOLERANCE and worst < default
