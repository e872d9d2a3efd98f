"""One process start of a tiny random Llama, run by tests/test_program_store.py: warm-up then greedy tokens.

A warm start is a fresh process, so the test runs this script several times over one compile cache and
compares what each start did. Prints one JSON line: traces and programs loaded during warm-up, tokens.

    python tests/program_store_worker.py CACHE_DIR [MAX_NUM_STEPS]
    python tests/program_store_worker.py CACHE_DIR --entries   # stale, foreign or damaged entries
"""

from __future__ import annotations

import json
import sys

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count, enable_compile_cache, trace_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
from maxjax.runtime.program_store import ProgramStore

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)


def main(cache_dir: str, max_num_steps: int = 4) -> dict:
    enable_compile_cache(cache_dir)
    params = llama.init_params(CFG, jax.random.key(0))
    runtime = RuntimeConfig(max_batch_size=2, max_seq_len=32, max_num_steps=max_num_steps, length_buckets=(32,))
    pipeline = TextGenerationPipeline(Engine(llama, CFG, dict(params, lm_head=params["lm_head"] * 8), runtime))
    traces, compiles = trace_count(), compile_count()
    programs = pipeline.warmup()
    warmup_traces = trace_count() - traces
    prompt = np.arange(5, 17, dtype=np.int32)
    ctx = TextContext("r", prompt, max_length=len(prompt) + 8, sampling_params=SamplingParams())
    tokens = []
    while not ctx.is_done:
        tokens += pipeline.next_token(TextGenerationInputs({"r": ctx}, num_steps=4))["r"].tokens
    return dict(programs=programs, loaded=pipeline.engine.programs_loaded, warmup_traces=warmup_traces,
                traces=trace_count() - traces, compiles=compile_count() - compiles, tokens=tokens)


def check_entries(cache_dir: str) -> dict:
    """A stored program loads under its key only; another key's file, a flipped byte, garbage or a truncated
    file loads as nothing (the caller compiles again)."""
    store = ProgramStore(Path(cache_dir))
    store.save("key-a", jax.jit(lambda x: x * 2 + 1).lower(jnp.zeros(4, jnp.float32)).compile())
    (entry,) = Path(cache_dir).glob("*.program")
    loaded = store.load("key-a")
    np.testing.assert_array_equal(loaded(jnp.arange(4, dtype=jnp.float32)), [1, 3, 5, 7])
    assert store.load("key-b") is None  # absent
    store._path("key-b").write_bytes(entry.read_bytes())  # a file under another key's name
    assert store.load("key-b") is None
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the payload
    entry.write_bytes(bytes(data))
    assert store.load("key-a") is None
    entry.write_bytes(b"garbage")
    assert store.load("key-a") is None
    entry.write_bytes(data[: len(data) // 2])  # truncated by a crash mid-write
    assert store.load("key-a") is None
    return {"entries": "ok"}


if __name__ == "__main__":
    if sys.argv[2:] == ["--entries"]:
        print(json.dumps(check_entries(sys.argv[1])))
    else:
        print(json.dumps(main(sys.argv[1], *map(int, sys.argv[2:]))))
