"""The KV cache budget: pages sized from a stated budget (``num_pages``, ``kv_cache_memory``, or the default:
32 sequences of 1k tokens on a CPU, half of what the weights leave on an accelerator), ``max_seq_len`` at the
model's own limit by default; with those defaults, nothing compiles after warm-up."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import maxjax
from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import TextGenerationInputs
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.memory import default_kv_budget, kv_bytes_per_token

GiB = 1 << 30
SMOLLM2 = llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                            num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


def test_default_budget_holds_32_chats_of_1k_tokens_on_a_cpu():
    import jax.numpy as jnp

    per_token = 2 * 30 * 3 * 64 * 4  # SmolLM2 float32: K and V of 30 layers, 3 kv heads of 64
    assert kv_bytes_per_token(llama, SMOLLM2, jnp.float32) == per_token == 46_080
    config = RuntimeConfig(max_batch_size=32, max_seq_len=8192)
    assert default_kv_budget(config, per_token, 538_000_000, 24 * GiB, "cpu") == 32 * 1024 * 46_080  # 1.5 GB
    # a small machine: at most a quarter of what the weights leave
    assert default_kv_budget(config, per_token, 538_000_000, 2 * GiB, "cpu") == (2 * GiB - 538_000_000) // 4
    # an accelerator: half of what the weights leave
    assert default_kv_budget(config, per_token, 16 * 10**9, 80 * 10**9, "gpu") == 32 * 10**9


@pytest.mark.parametrize("field, value, pages", [("num_pages", 40, 40), ("kv_cache_memory", 10 * 16 * 512 + 100, 10)])
def test_the_pool_takes_the_stated_size(tmp_path, field, value, pages):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from random_models import ensure_random_model

    folder = ensure_random_model("smollm2", tmp_path, quick=True).folder
    _, pipe = maxjax.load_pipeline(str(folder), max_seq_len=64, page_size=16, **{field: value})
    cfg = pipe.engine.model_config
    assert 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 == 512  # bytes a position takes
    assert pipe.engine.num_pages == pages == pipe.pages.stats()["kv_pages_total"]
    assert pipe.engine.kv_cache_bytes == pages * 16 * 512


def test_default_pipeline_compiles_nothing_after_warmup(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from random_models import ensure_random_model

    folder = ensure_random_model("smollm2", tmp_path, quick=True).folder  # 2 layers, vocab 512
    _, pipe = maxjax.load_pipeline(str(folder), max_seq_len=32, max_num_steps=4, scan_decode_layers=True,
                                   scan_prefill_layers=True)
    assert pipe.config.max_batch_size == 32 and pipe.config.batch_buckets == (1, 4, 8, 16, 32)
    assert pipe.warmup() == len(pipe.config.prefill_shapes()) + len(pipe.config.decode_shapes())
    before = compile_count()
    rng = np.random.default_rng(0)
    for batch in (32, 2, 9):  # a full batch, then partial ones (padded to the 4 and 16 buckets)
        live = {f"r{batch}-{i}": TextContext(f"r{batch}-{i}", rng.integers(3, 500, size=int(rng.integers(3, 24))),
                                             max_length=30) for i in range(batch)}
        while live:
            for rid, out in pipe.next_token(TextGenerationInputs(dict(live), 4)).items():
                if out.is_done:
                    pipe.release(rid)
                    del live[rid]
    assert compile_count() == before, "a default-sized batch compiled after warm-up"
    assert pipe.slots.num_free == 32 and pipe.engine.pool.num_used == 0


def test_max_seq_len_defaults_to_the_models_limit(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from random_models import ensure_random_model

    folder = ensure_random_model("smollm2", tmp_path, quick=True).folder
    _, pipe = maxjax.load_pipeline(str(folder))
    limit = json.loads((folder / "config.json").read_text())["max_position_embeddings"]  # read here, not by maxjax
    assert pipe.config.max_seq_len == limit == 1024  # the quick shape's limit
