"""One process start of a tiny random Llama, run by tests/test_program_store.py: warm-up then greedy tokens.

A warm start is a fresh process, so the test runs this script several times over one compile cache and
compares what each start did. Prints one JSON line: traces and programs loaded during warm-up, tokens.

    python tests/program_store_worker.py CACHE_DIR [MAX_NUM_STEPS]
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from maxjax.architectures import llama
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count, enable_compile_cache, trace_count
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

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


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *map(int, sys.argv[2:]))))
