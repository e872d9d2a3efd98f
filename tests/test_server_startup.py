"""A plain `maxjax serve` start (no --model: SmolLM2 as `smollm2`) with the runtime flags of `maxjax generate`:
the kept 4-bit GGUF weights (`--quantize gguf`), n-gram speculative decoding and two LoRA adapters served as model
names (`--lora NAME=PATH`, as vLLM's --lora-modules). One server process for the module; its port answers 503
`{"status": "loading"}` before the model is ready, and its start-up log says what it loads and what it costs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import running_server

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, Q_OUT, KV_OUT = 30, 576, 576, 192  # SmolLM2-135M: 9 query heads, 3 KV heads of 64



def _write_adapter(folder: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter on q_proj and v_proj of every layer, with random non-zero A and B."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, out in (("q_proj", Q_OUT), ("v_proj", KV_OUT)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = rng.standard_normal((rank, HIDDEN)) / HIDDEN ** 0.5
            tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.2).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "lora_dropout": 0.0}))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    tmp = tmp_path_factory.mktemp("serve-startup")
    adapters = {name: _write_adapter(tmp / name, seed) for seed, name in enumerate(["pirate", "poet"])}
    args = ["--no-warmup", "--quantize", "gguf", "--speculative", "ngram", "--num-speculative-tokens", "3",
            *[arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")],
            "--max-batch-size", "2", "--max-seq-len", "256", "--length-buckets", "128,256", "--max-num-steps", "4"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the server picks the platform list
    with running_server(args, tmp, env=env) as server:
        yield server.base, server.health_codes, server.log_path


def _complete(base: str, model: str, prompt: str, max_tokens: int = 12) -> dict:
    response = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_port_answers_loading_before_ready(server):
    _, answers, _ = server
    assert answers[0] == 503 and answers[-1] == 200 and set(answers) == {503, 200}


def test_start_up_says_what_it_loads_and_what_it_costs(server):
    log = server[2].read_text()
    assert "will serve smollm2 (text_generation)" in log and "LoRA adapters ['pirate', 'poet']" in log
    assert "quantize=gguf" in log  # the weights line
    assert "KV cache: " in log and " GB" in log
    assert "smollm2 ready in" in log and "programs (" in log and "all models ready" in log
    assert "libtpu" not in log and "Unable to initialize backend" not in log


def test_models_lists_the_default_name_and_the_adapters(server):
    base = server[0]
    listed = {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]}
    assert set(listed) == {"smollm2", "pirate", "poet"}
    assert listed["pirate"]["parent"] == listed["poet"]["parent"] == "smollm2" and "parent" not in listed["smollm2"]
    health = httpx.get(f"{base}/health", timeout=10).json()
    assert health["status"] == "ok" and health["models"]["smollm2"]["kv_cache_bytes"] > 0


def test_an_adapter_name_selects_the_adapter(server):
    base = server[0]
    prompt = "The three primary colors are"
    texts = {model: _complete(base, model, prompt)["choices"][0]["text"] for model in ("smollm2", "pirate", "poet")}
    assert len(set(texts.values())) == 3, texts  # each adapter changes the base model's greedy text
    again = _complete(base, "pirate", prompt)
    assert again["choices"][0]["text"] == texts["pirate"] and again["model"] == "pirate"
    body = {"model": "poet", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
    chat = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    assert chat.status_code == 200 and chat.json()["model"] == "poet"


def test_speculative_decoding_runs_in_the_server(server):
    base = server[0]
    before = httpx.get(f"{base}/health", timeout=10).json()["models"]["smollm2"]["speculative"]
    _complete(base, "smollm2", "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", max_tokens=16)
    after = httpx.get(f"{base}/health", timeout=10).json()["models"]["smollm2"]["speculative"]
    assert after["rounds"] > before["rounds"] and after["drafted"] > before["drafted"]
