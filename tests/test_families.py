"""The ten model families (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, Gemma 1/2/3, Phi-3) against
transformers on tiny random models.

Each model is built with transformers' own config class, saved as safetensors and loaded by maxjax: logits
within 1e-5 (float32) of transformers on prompts longer than the sliding window, and greedy tokens through
`next_token` (batched, unequal lengths) equal to transformers' `generate`, with no compile after warm-up.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from maxjax.architectures import llama, moe
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.models import load_model
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
from maxjax.weights import load_weights

VOCAB, WINDOW = 128, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
              initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)], "rope_theta": 10000.0,
            "original_max_position_embeddings": 128}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),  # QKV biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                    query_pre_attn_scalar=16, num_hidden_layers=4)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(sliding_window=WINDOW, query_pre_attn_scalar=16, num_hidden_layers=4,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 1e6}})),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(sliding_window=WINDOW, rope_parameters=LONGROPE, original_max_position_embeddings=128)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=WINDOW)),
}
RUNTIME = RuntimeConfig(max_batch_size=2, max_seq_len=64, max_num_steps=8, length_buckets=(64,),
                        batch_buckets=(2,), max_prefill_len=64)


def build_hf(kind: str, folder, **overrides):
    """A random transformers model of `kind`, norms and biases perturbed, saved as safetensors in `folder`."""
    config_cls, model_cls, extra = FAMILIES[kind]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms away from their trivial init, so a missed or mis-offset norm shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, build_hf(request.param, folder), folder


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_logits_match_transformers(family):
    kind, model, folder = family
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 40))  # 40 tokens > the sliding window of 8
    ours = load_model(folder, tokenizer=False)
    if kind in ("mistral", "gemma2", "gemma3_text", "phi3", "mixtral"):
        assert ours.config.sliding_window == WINDOW
    if kind == "llama":
        assert dict(ours.config.rope_scaling)["rope_type"] == "llama3"
    if kind == "qwen2":
        assert ours.config.attention_bias and ours.config.tie_word_embeddings
    reference = _hf_logits(model, ids)
    diff = np.abs(ours.logits(ids) - reference).max()
    print(f"{kind}: max abs logit diff vs transformers {diff:.2e} (logits up to {np.abs(reference).max():.1f})")
    assert diff < 1e-5, diff
    assert (ours.logits(ids).argmax(-1) == reference.argmax(-1)).all()


def _greedy_through_next_token(pipeline, prompts, steps=32):
    contexts = {f"r{i}": TextContext(f"r{i}", np.asarray(p, np.int32), max_length=len(p) + steps,
                                     sampling_params=SamplingParams(top_k=1)) for i, p in enumerate(prompts)}
    out = {rid: [] for rid in contexts}
    while contexts:
        results = pipeline.next_token(TextGenerationInputs(dict(contexts), num_steps=8))
        for rid, result in results.items():
            out[rid] += list(result.tokens)
            if result.is_done:
                pipeline.release(rid)
                del contexts[rid]
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.slow  # transformers' generate as the reference
def test_greedy_next_token_equals_generate_without_recompiles(family):
    kind, model, folder = family
    weights = load_weights(folder, with_tokenizer=False)
    pipeline = TextGenerationPipeline(Engine(llama, weights.config, weights.params, RUNTIME))
    pipeline.warmup()
    before = compile_count()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (20, 9)]  # unequal, the first exceeds the window
    ours = _greedy_through_next_token(pipeline, prompts)
    assert compile_count() == before
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert tokens == expected[0, len(prompt):].tolist(), kind


# ---- mixture of experts ----------------------------------------------------------------------------------

def test_moe_routing_equals_transformers(tmp_path):
    model = build_hf("qwen3_moe", tmp_path / "moe")
    weights = load_weights(tmp_path / "moe", with_tokenizer=False)
    hidden = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hf_weights, hf_experts = model.model.layers[1].mlp.gate(hidden)
    ours_weights, ours_experts = moe.route(hidden.numpy(), weights.params["layers"]["router"][1], 2, True)
    np.testing.assert_array_equal(np.asarray(ours_experts), hf_experts.numpy())
    np.testing.assert_allclose(np.asarray(ours_weights), hf_weights.numpy(), atol=1e-6)


def _matmul_flops(jaxpr, repeat: int = 1) -> int:
    """Multiply-add FLOPs of every dot in a jaxpr, loops (scan / lax.map) counted once per iteration."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lhs_contract]))
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _matmul_flops(inner, times)
    return total * repeat


def _moe_matmul_flops(num_tokens: int, num_experts: int, k: int = 2, D: int = 64, F: int = 128) -> int:
    shapes = [(1, num_tokens, D), (D, num_experts), (num_experts, D, F), (num_experts, D, F), (num_experts, F, D)]
    args = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
    jaxpr = jax.make_jaxpr(lambda h, r, g, u, d: moe.sparse_moe(h, r, g, u, d, k, True, jax.nn.silu))(*args)
    # without the router's logits and the weighted sum of each token's k expert outputs
    return _matmul_flops(jaxpr.jaxpr) - 2 * num_tokens * D * num_experts - 2 * num_tokens * k * D


def test_moe_computes_only_the_selected_experts():
    """The expert matmuls (counted in the program, loops included) scale with the tokens' k experts."""
    D, F, k, per_row = 64, 128, 2, 3 * 2 * 64 * 128  # gate, up and down of one expert for one token
    tokens = 4  # decode: one block per (token, expert) assignment, whatever the number of experts
    for experts in (16, 128):
        assert _moe_matmul_flops(tokens, experts) == tokens * k * per_row
    tokens, experts = 40, 8  # prefill: blocks of 8 rows, at most 7 padding rows per expert
    block = moe.block_size(tokens * k, experts)
    flops = _moe_matmul_flops(tokens, experts)
    print(f"MoE expert FLOPs, 40 tokens, top-2 of 8: {flops} (selected {tokens * k * per_row}, "
          f"every expert {tokens * experts * per_row})")
    assert block == 8 and tokens * k * per_row <= flops <= (tokens * k + experts * (block - 1)) * per_row
    assert flops < tokens * experts * per_row / 2


def test_sliding_layers_read_only_their_window_when_unrolled():
    """Unrolled layers (decode) gather only the window's cache entries on sliding layers: the logits of the
    scanned program, and a NaN written into the cache just outside the window (which a masked read would still
    multiply in: 0 * NaN) leaves the next token's logits unchanged, while a change just inside changes them."""
    cfg = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, sliding_window=WINDOW, post_norms=True, norm_offset=1.0,
                            layer_types=("sliding_attention", "full_attention"), attn_logit_softcap=5.0)
    params = llama.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(4).integers(3, VOCAB, (2, 25)).astype(np.int32)
    positions = np.stack([np.arange(24), np.where(np.arange(24) < 15, np.arange(24), -1)]).astype(np.int32)

    @jax.jit
    def run(p, t, pos, cache):
        return llama.forward(p, cfg, t, pos, cache, np.array([0, 1], np.int32), kv_len=64)

    scanned, _ = run(params, tokens[:, :24], positions, llama.init_kv_cache(cfg, 2, 64))
    unrolled, cache = llama.unstack_layers(params), llama.init_kv_cache(cfg, 2, 64)
    for start in range(0, 24, 8):  # chunks of 8 (decode's single tokens: the greedy tests above)
        chunk, cache = run(unrolled, tokens[:, start:start + 8], positions[:, start:start + 8], cache)
        real = positions[:, start:start + 8] >= 0
        np.testing.assert_allclose(chunk[real], scanned[:, start:start + 8][real], atol=1e-5)

    def next_logits(layer=0, position=None, value=np.nan):  # row 0's token at position 24, the cache changed
        k, v = cache.k, cache.v
        if position is not None:
            k, v = k.at[layer, 0, :, position].set(value), v.at[layer, 0, :, position].set(value)
        logits, _ = run(unrolled, tokens[:, 24:25], np.array([[24], [-1]], np.int32), cache._replace(k=k, v=v))
        return np.asarray(logits[0, -1])

    base = next_logits()
    assert np.isfinite(base).all()
    outside = 24 - WINDOW  # position 24 attends to 17..24 on the sliding layer
    np.testing.assert_array_equal(next_logits(0, outside), base)  # never read
    assert np.abs(next_logits(0, outside + 1, 3.0) - base).max() > 1e-3  # inside the window: read
    assert np.isnan(next_logits(1, outside)).all()  # the global layer reads every position


def test_model_store_round_trip_keeps_family_switches(tmp_path):
    from maxjax.weights import convert_to_store

    build_hf("gemma3_text", tmp_path / "gemma3")
    store = convert_to_store(tmp_path / "gemma3", "g3", models_dir=tmp_path / "models", with_tokenizer=False)
    original, restored = load_model(tmp_path / "gemma3", tokenizer=False), load_model(store, tokenizer=False)
    assert restored.config == original.config and restored.config.layer_types[1] == "full_attention"
    ids = np.random.default_rng(5).integers(3, VOCAB, (1, 20))
    np.testing.assert_array_equal(restored.logits(ids), original.logits(ids))


def test_unsupported_families_and_options_fail_clearly():
    from maxjax.architectures.registry import gguf_model_type, resolve_hf

    with pytest.raises(ValueError, match=r"model_type 'gpt_neox'.*supported model types: llama.*gemma2.*phi3"):
        resolve_hf({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    with pytest.raises(ValueError, match=r"general.architecture 'falcon' is not supported \(supported: llama.*"):
        gguf_model_type("falcon", "x.gguf")
    _, cfg = resolve_hf({**COMMON, "model_type": None, "architectures": ["Gemma2ForCausalLM"],
                         "num_hidden_layers": 2})
    assert cfg.post_norms and cfg.layer_types == ("sliding_attention", "full_attention")
    moe_config = {**COMMON, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 8, "mlp_only_layers": [0]}
    with pytest.raises(ValueError, match="mlp_only_layers"):
        resolve_hf(moe_config)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        resolve_hf({**COMMON, "model_type": "phi3", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        resolve_hf({**COMMON, "model_type": "qwen3", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="to_hf writes Llama/Mistral configs"):
        cfg.to_hf()


def test_longrope_switches_to_long_factors_at_the_original_context(tmp_path):
    """Positions from original_max_position_embeddings on use the long factors, as transformers' cached forward
    does token by token (its `generate` instead re-encodes the whole sequence with them once, at the crossing)."""
    from transformers import DynamicCache

    model = build_hf("phi3", tmp_path / "phi3", rope_parameters={**LONGROPE, "original_max_position_embeddings": 24},
                     original_max_position_embeddings=24)
    weights = load_weights(tmp_path / "phi3", with_tokenizer=False)
    ids = np.random.default_rng(6).integers(3, VOCAB, 30)
    forward = jax.jit(lambda p, t, pos, c: llama.forward(p, weights.config, t, pos, c, np.zeros(1, np.int32),
                                                         kv_len=64))
    params, cache = jax.device_put(weights.params), llama.init_kv_cache(weights.config, 1, 64)
    ours, cache = forward(params, ids[None, :20], np.arange(20)[None], cache)
    hf_cache = DynamicCache(config=model.config)  # updated in place by each call
    with torch.no_grad():
        model(torch.tensor(ids[None, :20]), cache=hf_cache, use_cache=True)
        for t in range(20, 30):  # crosses position 24
            ours, cache = forward(params, ids[None, t:t + 1], np.array([[t]]), cache)
            out = model(torch.tensor(ids[None, t:t + 1]), cache=hf_cache, use_cache=True)
            np.testing.assert_allclose(np.asarray(ours[0, -1]), out.logits[0, -1].numpy(), atol=1e-5)


def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(tmp_path):
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration: config in text_config, names under language_model."""
    text = {**COMMON, **FAMILIES["gemma3_text"][2]}
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=5, boi_token_index=6, eoi_token_index=7)
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "gemma3mm")
    ours = load_model(tmp_path / "gemma3mm", tokenizer=False)
    ids = np.random.default_rng(7).integers(8, VOCAB, (1, 20))
    diff = np.abs(ours.logits(ids) - _hf_logits(model, ids)).max()
    print(f"gemma3 (multimodal checkpoint, text): max abs logit diff vs transformers {diff:.2e}")
    assert diff < 1e-5, diff
