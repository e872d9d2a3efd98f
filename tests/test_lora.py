"""LoRA adapters through the TokenGenerator / AudioGenerator protocols, on tiny random Llamas.

Adapters are written by PEFT (random non-zero B). The reference merges each adapter into the weights on the
host, straight from the PEFT file (W + (B A)^T * scale), and runs the plain model without any LoRA code:
independent of the loader, the rank padding, the slot table and the batched gather-matmul.
"""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import AudioGenerationRequest, PipelineTask, SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
RUNTIME = RuntimeConfig(max_batch_size=4, max_seq_len=64, max_num_steps=8, length_buckets=(64,), batch_buckets=(1, 4),
                        max_loras=2, max_lora_rank=8)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARAM_OF = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
            "up_proj": "w_up", "down_proj": "w_down"}
LOGITS_TOLERANCE = 1e-5  # float32: (x W) + (x A) B vs x (W + A B); measured 2.8e-6


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    return dict(p, lm_head=p["lm_head"] * 8)  # greedy text varies instead of repeating one token


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, add_random_lora):
    """PEFT adapter folders: four that fit (one with per-module ranks and alphas), one of rank 16 (above the
    max), one for other shapes, a pickle."""
    transformers = require("transformers")
    folder = tmp_path_factory.mktemp("lora")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.to_hf()))
    model = add_random_lora(hf, folder, "qv", ["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    model = add_random_lora(model, folder, "all", ALL, r=8, alpha=16, rslora=True, seed=2)
    model = add_random_lora(model, folder, "mlp", ["gate_proj", "up_proj", "down_proj"], r=2, alpha=2, seed=3)
    model = add_random_lora(model, folder, "pattern", ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, seed=7,
                            rank_pattern={"q_proj": 2, "down_proj": 8}, alpha_pattern={"v_proj": 12})
    add_random_lora(model, folder, "wide", ["q_proj"], r=16, alpha=16, seed=4)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(CFG.to_hf(), intermediate_size=96)))
    add_random_lora(other, folder, "other", ALL, r=4, alpha=4, seed=5)
    shutil.copytree(folder / "qv", folder / "pickled")
    (folder / "pickled" / "adapter_model.safetensors").rename(folder / "pickled" / "adapter_model.bin")
    return {name: folder / name for name in ("qv", "all", "mlp", "pattern", "wide", "other", "pickled")}


def merged(params, folder):
    """Params with the PEFT adapter at ``folder`` merged into the weights (numpy, from the file itself)."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    layers = {k: np.array(v) for k, v in params["layers"].items()}
    for name, a in tensors.items():
        if "lora_A" in name:
            layer, module = int(re.search(r"layers\.(\d+)\.", name)[1]), name.split(".")[-3]
            r, alpha = a.shape[0], config["alpha_pattern"].get(module, config["lora_alpha"])
            scale = alpha / (math.sqrt(r) if config["use_rslora"] else r)
            layers[PARAM_OF[module]][layer] += (tensors[name.replace("lora_A", "lora_B")] @ a).T * scale
    return dict(params, layers=layers)


@jax.jit
def _full_logits(params, tokens, positions):
    cache = llama.init_kv_cache(CFG, tokens.shape[0], RUNTIME.max_seq_len)
    logits, _ = llama.forward(params, CFG, tokens, positions, cache, jnp.arange(tokens.shape[0]),
                              kv_len=RUNTIME.max_seq_len)
    return logits


def padded(rows):
    tokens = np.zeros((len(rows), RUNTIME.max_seq_len), np.int32)
    positions = np.full((len(rows), RUNTIME.max_seq_len), -1, np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)], positions[b, :len(row)] = row, np.arange(len(row))
    return tokens, positions


def reference_greedy(params, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        logits = np.asarray(_full_logits(params, *padded([tokens])))
        tokens.append(int(logits[0, len(tokens) - 1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def pipeline(params, adapters):
    pipe = TextGenerationPipeline(Engine(llama, CFG, params, RUNTIME))
    pipe.warmup()
    pipe.add_lora("qv", adapters["qv"])
    pipe.add_lora("all", adapters["all"])
    return pipe


def prompts(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, CFG.vocab_size, size=n).astype(np.int32) for n in lengths]


def context(rid, prompt, lora_name=None, max_new=10):
    return TextContext(rid, prompt, max_length=len(prompt) + max_new, lora_name=lora_name)


def test_logits_of_mixed_rows_equal_merged_weights(pipeline, params, adapters):
    rows = prompts(6, 11, 9)
    names = [None, "qv", "all"]
    tokens, positions = padded(rows)
    engine = pipeline.engine
    index = jnp.asarray([engine.lora_slot(n) for n in names], jnp.int32)
    cache = llama.init_kv_cache(CFG, len(rows), RUNTIME.max_seq_len)
    hidden, _ = llama.forward_hidden(engine.params, CFG, tokens, positions, cache, jnp.arange(len(rows)),
                                     kv_len=RUNTIME.max_seq_len, scan=True, lora_index=index)
    got = np.asarray(llama.lm_head(engine.params, CFG, hidden))
    worst = 0.0
    for b, (row, name) in enumerate(zip(rows, names)):
        ref = np.asarray(_full_logits(params if name is None else merged(params, adapters[name]),
                                      *padded([row])))[0, :len(row)]
        worst = max(worst, float(np.abs(got[b, :len(row)] - ref).max()))
        if name is not None:  # the adapter really changes the model
            assert np.abs(ref - np.asarray(_full_logits(params, *padded([row])))[0, :len(row)]).max() > 0.1
    print(f"max abs logit diff vs merged weights: {worst:.2e}")
    assert worst <= LOGITS_TOLERANCE


def references(params, adapters, rows, names):
    return [reference_greedy(params if n is None else merged(params, adapters[n]), p, 10) for p, n in zip(rows, names)]


def test_mixed_batch_equals_each_row_alone_and_merged_reference(pipeline, params, adapters, run_requests):
    rows = prompts(5, 9, 7, 12, seed=1)
    names = [None, "qv", "all", "qv"]
    expected = references(params, adapters, rows, names)
    assert expected[1] != reference_greedy(params, rows[1], 10)  # the adapter changes the text
    before = compile_count()
    batch = run_requests(pipeline, {f"r{i}": context(f"r{i}", p, n) for i, (p, n) in enumerate(zip(rows, names))})
    for i, (p, n) in enumerate(zip(rows, names)):
        alone = run_requests(pipeline, {"alone": context("alone", p, n)})["alone"]
        assert batch[f"r{i}"] == alone == expected[i], (i, n)
    assert compile_count() == before


def test_add_remove_and_mix_compile_nothing(pipeline, params, adapters, run_requests):
    rows = prompts(8, 6, 10, 9, seed=2)
    names = ["mlp", None, "all", "pattern"]
    expected = references(params, adapters, rows, names)
    before = compile_count()
    pipeline.remove_lora("qv")
    pipeline.add_lora("mlp", adapters["mlp"])  # takes the freed slot
    assert sorted(pipeline.lora_names) == ["all", "mlp"]
    out = run_requests(pipeline, {f"r{i}": context(f"r{i}", p, n) for i, (p, n) in enumerate(zip(rows[:3], names))})
    assert [out[f"r{i}"] for i in range(3)] == expected[:3]
    pipeline.remove_lora("all")
    pipeline.add_lora("pattern", adapters["pattern"])  # per-module ranks 2/4/8 and alphas
    out = run_requests(pipeline, {"r3": context("r3", rows[3], "pattern"), "r0": context("r0", rows[0], "mlp")})
    assert [out["r3"], out["r0"]] == [expected[3], expected[0]]
    pipeline.remove_lora("mlp")
    pipeline.remove_lora("pattern")
    pipeline.add_lora("qv", adapters["qv"])
    pipeline.add_lora("all", adapters["all"])
    assert compile_count() == before


def test_bad_adapters_and_names_fail_clearly_and_leave_others_unharmed(pipeline, params, adapters, run_requests):
    good, bad = prompts(7, 5, seed=3)
    expected = references(params, adapters, [good], ["qv"])[0]
    before = compile_count()
    with pytest.raises(ValueError, match=r"rank 16, above the runtime's max_lora_rank \(8\)"):
        pipeline.add_lora("wide", adapters["wide"])
    with pytest.raises(ValueError, match=r"mlp.down_proj has lora_A .* does not match this model's shapes"):
        pipeline.add_lora("other", adapters["other"])
    with pytest.raises(ValueError, match="pickle adapters are refused"):
        pipeline.add_lora("pickled", adapters["pickled"])
    with pytest.raises(ValueError, match="all max_loras=2 slots hold adapters"):
        pipeline.add_lora("mlp", adapters["mlp"])
    with pytest.raises(ValueError, match="already loaded"):
        pipeline.add_lora("qv", adapters["qv"])
    assert sorted(pipeline.lora_names) == ["all", "qv"]

    contexts = {"good": context("good", good, "qv"), "bad": context("bad", bad, "nope")}
    with pytest.raises(ValueError, match=r"request 'bad': lora_name 'nope' is not a loaded LoRA adapter; "
                                         r"loaded: \['all', 'qv'\]"):
        pipeline.next_token(TextGenerationInputs(contexts, 8))
    assert pipeline.slots.num_free == RUNTIME.max_batch_size  # nothing assigned, nothing leaked
    assert run_requests(pipeline, {"good": contexts["good"]})["good"] == expected

    ctx = context("busy", good, "all")
    pipeline.next_token(TextGenerationInputs({"busy": ctx}, 1))
    with pytest.raises(ValueError, match=r"'all' is in use by request\(s\) \['busy'\]"):
        pipeline.remove_lora("all")
    pipeline.release("busy")
    with pytest.raises(ValueError, match="lora_name 'gone' is not a loaded LoRA adapter"):
        pipeline.remove_lora("gone")
    assert compile_count() == before


def test_lora_off_rejects_lora_names(params):
    pipe = TextGenerationPipeline(Engine(llama, CFG, params, RuntimeConfig(max_batch_size=1, max_seq_len=64)))
    assert "lora" not in pipe.engine.params["layers"][0]  # exactly the programs without LoRA
    ctx = context("r", prompts(4)[0], "qv")
    with pytest.raises(ValueError, match=r"lora_name 'qv' is not a loaded LoRA adapter; loaded: none"):
        pipe.next_token(TextGenerationInputs({"r": ctx}, 1))
    with pytest.raises(ValueError, match="LoRA is off for this runtime"):
        pipe.add_lora("qv", "/nonexistent")


def test_audio_requests_pick_their_adapter(tmp_path, add_random_lora, run_requests):
    """The speech stage of the (random) Orpheus pipeline serves `AudioGenerationRequest.lora` per row."""
    transformers = require("transformers")
    from maxjax.pipelines.audio import load_audio_pipeline
    from maxjax.pipelines.orpheus_random import orpheus_llama_config

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**orpheus_llama_config().to_hf()))
    add_random_lora(hf, tmp_path, "voice", ["o_proj", "down_proj"], r=4, alpha=4, seed=6, std=1.0)
    tokenizer, pipeline = load_audio_pipeline(None, PipelineTask.SPEECH_TOKEN_GENERATION, max_batch_size=2,
                                              max_seq_len=256, length_buckets=(256,), num_steps=8,
                                              lora_adapters={"voice": tmp_path / "voice"})
    assert pipeline.config.max_loras == 1 and pipeline.lora_names == ["voice"]

    def request(rid, lora):
        return AudioGenerationRequest(request_id=rid, index=0, model="orpheus:tara", input="Hello there", lora=lora,
                                      sampling_params=SamplingParams(max_new_tokens=16))

    with pytest.raises(ValueError, match=r"lora 'nope' is not a loaded LoRA adapter; loaded: \['voice'\]"):
        tokenizer.build_context(request("x", "nope"))
    contexts = {rid: tokenizer.build_context(request(rid, lora)) for rid, lora in (("base", None), ("voice", "voice"))}
    mixed = run_requests(pipeline, contexts)
    alone = {rid: run_requests(pipeline, {rid: tokenizer.build_context(request(rid, lora))})[rid]
             for rid, lora in (("base", None), ("voice", "voice"))}
    assert mixed == alone
    assert mixed["base"] != mixed["voice"]


def test_cli_lora_flags_are_checked_before_loading(capsys):
    from maxjax.cli import main

    assert main(["generate", "hi", "--lora", "no-equals-sign"]) == 2
    assert "--lora 'no-equals-sign': expected NAME=PATH" in capsys.readouterr().err
    assert main(["generate", "hi", "--lora", "a=x", "--lora", "a=y"]) == 2
    assert "adapter name 'a' given twice" in capsys.readouterr().err
