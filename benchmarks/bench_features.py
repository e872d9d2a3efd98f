"""Per-step cost of log-probabilities and structured output relative to plain decoding (SmolLM2-135M).

    python benchmarks/bench_features.py            # batch 2, 96 new tokens per row, 3 repeats
    python benchmarks/bench_features.py --quick    # batch 1, 24 tokens, 1 repeat (seconds)
    python benchmarks/bench_features.py --json out.json --model path/or/gguf

Modes, each on the same compiled programs after one warm-up:

* ``plain``: multi-step decode (``num_steps`` tokens per device call);
* ``plain_1step``: the same with one token per call (what a constrained batch must do);
* ``logprobs5``: ``logprobs=5`` on every row (top-5 computed on the device, copied with the tokens);
* ``json_schema``: every row constrained by a JSON schema (llguidance mask filled on the host per step).

The figure is decode tokens per second over all rows (prefill excluded: the first call, which prefills,
is not timed) and milliseconds per decode step (one token for every row); ``relative`` is the step time
over ``plain``'s. Plain and logprobs rows ignore eos so every mode generates the same number of tokens;
the schema asks for a long array so constrained rows run about as long.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from common import write_json

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "facts"], "properties": {
    "city": {"type": "string", "maxLength": 20},
    "facts": {"type": "array", "minItems": 24, "maxItems": 24, "items": {"type": "string", "maxLength": 40}}}}
PROMPT = [{"role": "user", "content": "List facts about Paris as JSON."}]


def run_mode(tokenizer, pipeline, mode: str, batch: int, new_tokens: int, num_steps: int) -> tuple[float, int, int]:
    """(seconds, tokens, steps) of the decode part of one batch run in ``mode``."""
    from maxjax.interfaces import SamplingParams, TextGenerationInputs, TextGenerationRequest

    contexts = {}
    for i in range(batch):
        extra = {}
        if mode == "logprobs5":
            extra["logprobs"] = 5
        if mode == "json_schema":
            extra["response_format"] = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=mode != "json_schema", top_k=0, seed=i)
        request = TextGenerationRequest(request_id=f"{mode}{i}", index=i, model_name="bench", messages=PROMPT,
                                        sampling_params=params, **extra)
        contexts[request.request_id] = tokenizer.build_context(request)
    steps = 1 if mode in ("plain_1step", "json_schema") else num_steps
    tokens = sum(len(o.tokens) for o in pipeline.next_token(TextGenerationInputs(contexts, 1)).values())
    first = tokens
    start = time.perf_counter()
    while not all(c.is_done for c in contexts.values()):
        tokens += sum(len(o.tokens) for o in pipeline.next_token(TextGenerationInputs(contexts, steps)).values())
    seconds = time.perf_counter() - start
    decode_steps = max(c.num_generated for c in contexts.values()) - 1
    for rid in contexts:
        pipeline.release(rid)
    return seconds, tokens - first, decode_steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true", help="batch 1, 24 tokens, one repeat")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    batch = args.batch or (1 if args.quick else 2)
    new_tokens = args.tokens or (24 if args.quick else 96)
    repeats = args.repeats or (1 if args.quick else 3)
    num_steps = 8

    from maxjax.pipelines.registry import load_text_pipeline

    tokenizer, pipeline = load_text_pipeline(args.model, max_batch_size=batch, max_seq_len=256,
                                             length_buckets=(256,), batch_buckets=(batch,), max_num_steps=num_steps,
                                             max_logprobs=5)
    pipeline.warmup()
    modes = ["plain", "plain_1step", "logprobs5", "json_schema"]
    for mode in modes:  # warm the host paths (grammar tokenizer, first matcher)
        run_mode(tokenizer, pipeline, mode, batch, 8, num_steps)
    results = {}
    for mode in modes:
        runs = [run_mode(tokenizer, pipeline, mode, batch, new_tokens, num_steps) for _ in range(repeats)]
        seconds = statistics.median(r[0] for r in runs)
        tokens, steps = runs[0][1], runs[0][2]
        results[mode] = {"tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds / steps, "tokens": tokens,
                         "steps": steps}
    base = results["plain"]["ms_per_step"]
    for r in results.values():
        r["relative"] = r["ms_per_step"] / base
    report = {"model": pipeline.model_name, "batch": batch, "new_tokens": new_tokens, "num_steps": num_steps,
              "repeats": repeats, "machine": platform.machine(), "results": results}
    print(f"{pipeline.model_name}: batch {batch}, {new_tokens} new tokens per row, num_steps {num_steps}")
    print(f"{'mode':<13}{'tokens/s':>10}{'ms/step':>10}{'relative':>10}")
    for mode, r in results.items():
        print(f"{mode:<13}{r['tokens_per_s']:>10.1f}{r['ms_per_step']:>10.2f}{r['relative']:>10.2f}")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
