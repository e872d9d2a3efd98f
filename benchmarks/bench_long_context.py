"""Long context on the paged KV cache: a prompt of ``--context`` tokens prefilled in chunks, then greedy decode.

Reports the prefill time, decode tokens/s at that context and at 1k, the peak resident memory against the
weights and the KV cache pool, and (``--hf``) whether the greedy tokens equal HF transformers' on the same
weights. The default model is SmolLM2-135M-Instruct (its limit: 8192); ``--random-shape llama-1b`` builds a
random model of Llama-3.2-1B's shape (16 layers, 131072 positions) for 32k contexts.

    PYTHONPATH=.:benchmarks python benchmarks/bench_long_context.py --context 8192 --hf
    PYTHONPATH=.:benchmarks python benchmarks/bench_long_context.py --random-shape llama-1b --context 32768
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

from common import make_prompts, write_json


def rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def greedy(pipe, prompt: np.ndarray, new_tokens: int, rid: str) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the rest) of one greedy request."""
    from maxjax.context import TextContext
    from maxjax.interfaces import SamplingParams, TextGenerationInputs

    ctx = TextContext(rid, prompt, max_length=len(prompt) + new_tokens,
                      sampling_params=SamplingParams(top_k=1, ignore_eos=True))
    t0 = time.perf_counter()
    tokens = list(pipe.next_token(TextGenerationInputs({rid: ctx}, 1))[rid].tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    while not ctx.is_done:
        tokens += pipe.next_token(TextGenerationInputs({rid: ctx}, pipe.config.max_num_steps))[rid].tokens
    rest = time.perf_counter() - t0
    pipe.release(rid)
    return tokens, first, rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--random-shape", default=None, help="a random_models.py shape, e.g. llama-1b")
    parser.add_argument("--cpu-shape", action="store_true",
                        help="the shape's CPU variant (random_models.py: its layer widths, 2 layers, 32768 vocabulary)")
    parser.add_argument("--cache-dir", default="~/.cache/maxjax-bench")
    parser.add_argument("--hf", action="store_true", help="compare the greedy tokens with HF transformers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from maxjax.pipelines.registry import load_text_pipeline
    from maxjax.weights.quantize import weight_bytes

    model = None
    if args.random_shape:
        from random_models import ensure_random_model

        model = ensure_random_model(args.random_shape, args.cache_dir, cpu=args.cpu_shape).folder
    page_size, total = 64, args.context
    start_rss = rss_bytes()
    _, pipe = load_text_pipeline(model, max_seq_len=total, max_batch_size=1, max_num_steps=16,
                                 prefix_caching=False, num_pages=-(-total // page_size), page_size=page_size)
    engine = pipe.engine
    results = {"command": " ".join(["bench_long_context.py"] + (argv or sys.argv[1:])), "model": str(model),
               "context": args.context, "weights_bytes": weight_bytes(engine.params),
               "kv_cache_bytes": engine.kv_cache_bytes, "rss_before_load_bytes": start_rss,
               "rss_after_load_bytes": rss_bytes()}
    vocab = engine.vocab_size
    decode = {}
    for context in sorted({1024, args.context}):
        prompt = make_prompts(1, context - args.new_tokens, vocab, seed=context)[0]
        greedy(pipe, prompt[:64], 2, f"warm{context}")  # compiles the short programs first
        tokens, first, rest = greedy(pipe, prompt, args.new_tokens, f"c{context}")
        tokens, first, rest = greedy(pipe, prompt, args.new_tokens, f"d{context}")  # compiled: timed
        decode[context] = {"prefill_s": first, "decode_tok_s": (len(tokens) - 1) / rest}
        print(f"context {context}: prefill {first:.1f} s, decode {decode[context]['decode_tok_s']:.1f} tok/s",
              flush=True)
        if context == args.context:
            results["greedy_tokens"] = tokens
            results["prompt"] = prompt
    results["by_context"] = decode
    results["rss_peak_bytes"] = rss_bytes()
    results["rss_peak_over_weights_and_kv_bytes"] = (results["rss_peak_bytes"] - results["weights_bytes"]
                                                    - results["kv_cache_bytes"])
    gb = {k: results[k] / 1e9 for k in ("rss_peak_bytes", "weights_bytes", "kv_cache_bytes",
                                         "rss_peak_over_weights_and_kv_bytes")}
    print(f"peak RSS {gb['rss_peak_bytes']:.2f} GB = weights {gb['weights_bytes']:.2f} + KV {gb['kv_cache_bytes']:.2f}"
          f" + the rest {gb['rss_peak_over_weights_and_kv_bytes']:.2f}", flush=True)
    if args.hf:
        from bench_generate import HFRunner
        from maxjax.weights import resolve_source

        source = Path(resolve_source(model).path) if model is None else Path(model)
        hf = HFRunner(source, None)
        theirs = hf.generate(results["prompt"][None], args.new_tokens)[0].tolist()
        ours = results["greedy_tokens"]
        results["hf_same_tokens"] = sum(a == b for a, b in zip(ours, theirs)) / len(theirs)
        results["hf_first_difference"] = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        print(f"greedy tokens equal to HF: {results['hf_same_tokens']:.0%} (first difference at "
              f"{results['hf_first_difference']})", flush=True)
    results.pop("prompt")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
