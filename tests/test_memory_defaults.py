"""The default number of KV cache slots: as many as the device's memory holds beside the weights (up to 32),
so ``LLM`` and the server decode a batch of 32 at once; a large model on a small device gets fewer. With
that default, nothing compiles after warm-up."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import maxjax
from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import TextGenerationInputs
from maxjax.runtime.compile_cache import compile_count
from maxjax.runtime.memory import default_max_batch_size, device_memory_bytes, slots_for_memory

GiB = 1 << 30
SMOLLM2 = llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                            num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


def test_slots_fit_a_quarter_of_the_memory_left_beside_the_weights():
    per_slot = 2 * 30 * 3 * 2048 * 64 * 4  # SmolLM2 float32, 2048 positions: 94 MB
    assert default_max_batch_size(llama, SMOLLM2, {}, 2048, jnp.float32) == slots_for_memory(
        per_slot, 0, device_memory_bytes())
    assert slots_for_memory(per_slot, 538_000_000, 16 * GiB) == 32  # a laptop: capped at 32
    assert slots_for_memory(per_slot, 538_000_000, 2 * GiB) == 4  # 378 MB of cache budget
    assert slots_for_memory(per_slot, 538_000_000, 600_000_000) == 1  # not even one slot in budget: one anyway
    llama_8b = 2 * 32 * 8 * 2048 * 128 * 2  # bfloat16: 268 MB a slot
    assert slots_for_memory(llama_8b, 16 * 10**9, 24 * 10**9) == 4  # 2 GB budget beside 16 GB of weights
    assert slots_for_memory(llama_8b, 16 * 10**9, 141 * 10**9) == 32
    assert slots_for_memory(per_slot, 0, 16 * GiB, multiple_of=3) == 30  # data_parallel 3 divides it


def test_default_pipeline_takes_the_memory_default_and_compiles_nothing_after_warmup(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from random_models import ensure_random_model

    folder = ensure_random_model("smollm2", tmp_path, quick=True).folder  # 2 layers, vocab 512
    _, pipe = maxjax.load_pipeline(str(folder), max_seq_len=32, max_num_steps=4, scan_decode_layers=True,
                                   scan_prefill_layers=True)
    engine = pipe.engine
    slots = default_max_batch_size(llama, engine.model_config, engine.params, 32, jnp.float32)
    assert slots == 32 and pipe.config.max_batch_size == slots and pipe.config.batch_buckets == (1, 4, 8, 16, 32)
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
    assert pipe.slots.num_free == slots
