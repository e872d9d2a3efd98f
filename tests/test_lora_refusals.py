"""LoRA variants whose math differs from plain LoRA are refused with a ValueError naming the field: DoRA,
``modules_to_save``, embedding and ``lm_head`` targets. The adapters are written by PEFT itself, so the test
reads the same adapter_config.json and tensor names a user's training run leaves."""

from __future__ import annotations

import json
import shutil

import jax
import pytest

from maxjax.architectures import llama
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
from maxjax.weights.lora import load_lora_adapter
from conftest import require

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)

# name -> (PEFT LoraConfig fields, the field the refusal names)
VARIANTS = {
    "dora": (dict(target_modules=["q_proj", "v_proj"], use_dora=True), r"use_dora=True: DoRA is not supported"),
    "saved": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
              r"modules_to_save=\['lm_head'\]: modules_to_save .* is not supported"),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]),
                  r"target_modules \['embed_tokens'\] are not supported"),
    "lm_head": (dict(target_modules=["lm_head"]), r"target_modules \['lm_head'\] are not supported"),
}
# target_modules given as a regex is stored as one string: then the embedding's tensors give it away
REGEX_REFUSAL = r"tensor \S*embed_tokens\S* is not a LoRA matrix .*embedding"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, add_random_lora):
    transformers = require("transformers")
    folder = tmp_path_factory.mktemp("lora_variants")
    for name, (fields, _) in VARIANTS.items():
        add_random_lora(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.to_hf())), folder, name,
                        fields["target_modules"], r=4, alpha=8,
                        **{k: v for k, v in fields.items() if k != "target_modules"})
    add_random_lora(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.to_hf())), folder, "plain",
                    ["q_proj", "v_proj"], r=4, alpha=8)
    shutil.copytree(folder / "embedding", folder / "embedding_regex")
    config = json.loads((folder / "embedding_regex" / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.(embed_tokens|q_proj)"
    (folder / "embedding_regex" / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_are_refused_naming_the_field(adapters, name):
    with pytest.raises(ValueError, match=VARIANTS[name][1]):
        load_lora_adapter(adapters / name, CFG)


def test_an_embedding_adapter_with_a_regex_target_is_refused_by_its_tensors(adapters):
    with pytest.raises(ValueError, match=REGEX_REFUSAL):
        load_lora_adapter(adapters / "embedding_regex", CFG)


def test_a_pipeline_refuses_them_and_keeps_serving_plain_adapters(adapters):
    params = llama.init_params(CFG, jax.random.key(0))
    pipeline = TextGenerationPipeline(Engine(llama, CFG, params, RuntimeConfig(max_batch_size=1, max_seq_len=64,
                                                                               max_loras=2, max_lora_rank=8)))
    for name in ("dora", "saved", "embedding"):
        with pytest.raises(ValueError, match=VARIANTS[name][1]):
            pipeline.add_lora(name, adapters / name)
    assert pipeline.lora_names == []
    pipeline.add_lora("plain", adapters / "plain")
    assert pipeline.lora_names == ["plain"]
