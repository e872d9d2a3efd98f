"""``bench_generate.py --end-to-end``: prompt in, tokens out with the default ``load_pipeline()`` against HF
transformers in one run (see bench_generate.py's docstring). Kept apart from bench_generate.py's decode,
start-up and peer measurements; it reuses their runners and timing helpers."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench_generate import HFRunner, MaxjaxRunner, format_ttft, rates_against_hf, start_child, time_to_first_token
from common import TTFT_ROUNDS, make_prompts, write_json
from machine import load_average


def end_to_end(args, gguf, runtime: dict) -> dict:
    """Prompt in, tokens out, with ``runtime`` (empty: the default ``load_pipeline()``) against HF ``generate``
    on the whole batch, in one run: end-to-end and decode tokens/s per batch size, time to first token, and
    (unless --no-start) a fresh process's cold warm-up of every default program."""
    from maxjax.runtime.compile_cache import compile_count

    batches = [int(b) for b in args.batch_sizes.split(",")]
    P, N = args.prompt_len, args.new_tokens
    results: dict = {"command": " ".join([Path(sys.argv[0]).name] + args.argv), "model": str(gguf),
                     "machine": {"load_average_start": load_average()}, "runtime": runtime}
    mx = MaxjaxRunner(gguf, runtime)
    hf = None if args.no_hf else HFRunner(gguf, args.torch_threads, "float32")
    results["config"] = {k: str(v) for k, v in vars(mx.pipe.config).items()}
    prompts = {b: make_prompts(b, P, mx.vocab, seed=b) for b in batches}
    ttft_prompt = make_prompts(1, args.ttft_len, mx.vocab, seed=7)
    t0 = time.perf_counter()  # first use compiles the programs these requests need (as LLM does, lazily)
    for b in batches:
        mx.generate(prompts[b], min(N, mx.num_steps + 2))
    mx.generate(ttft_prompt, 1)
    results["maxjax_first_use_compile_s"] = time.perf_counter() - t0
    results["programs_used"] = mx.pipe.engine.num_programs
    compiles_before = compile_count()
    rows = []
    for b, ours, theirs, same in rates_against_hf(mx, hf, prompts, N, args.repeats):
        row = {"batch": b, "maxjax_e2e_tok_s": ours["e2e_tok_s"], "maxjax_decode_tok_s": ours["decode_tok_s"],
               "maxjax_first_token_s": ours["first_token_s"]}
        if theirs is not None:
            row.update(hf_e2e_tok_s=theirs["e2e_tok_s"], hf_decode_tok_s=theirs["decode_tok_s"],
                       hf_first_token_s=theirs["first_token_s"], e2e_ratio=ours["e2e_tok_s"] / theirs["e2e_tok_s"],
                       decode_ratio=ours["decode_tok_s"] / theirs["decode_tok_s"])
        if same is not None:
            row["greedy_same_tokens"] = same
        rows.append(row)
        print(f"  batch {b}: {row}", file=sys.stderr, flush=True)
    results["end_to_end"] = rows
    ttft = time_to_first_token(mx, hf, ttft_prompt, 1 if args.quick else TTFT_ROUNDS)
    if hf is not None:
        ttft["maxjax_over_hf"] = ttft["maxjax_s"] / ttft["hf_s"]
    results["ttft"] = ttft
    results["compiles_during_timed_part"] = compile_count() - compiles_before
    if not args.no_start:
        with tempfile.TemporaryDirectory() as cache_dir:
            results["cold_start"] = start_child(gguf, runtime, cache_dir, P)
    results["machine"]["load_average_end"] = load_average()
    print(format_end_to_end(results))
    write_json(args.json, results)
    return results


def format_end_to_end(r: dict) -> str:
    nan = float("nan")
    lines = [f"end to end, {'default load_pipeline()' if not r['runtime'] else r['runtime']} - "
             f"{Path(r['model']).name} ({r['command']})",
             f"{'batch':>5} | {'maxjax e2e':>10} | {'HF e2e':>7} | {'ratio':>6} | {'maxjax decode':>13} | "
             f"{'HF decode':>9} | {'ratio':>6}"]
    for row in r["end_to_end"]:
        lines.append(f"{row['batch']:>5} | {row['maxjax_e2e_tok_s']:>10.1f} | {row.get('hf_e2e_tok_s', nan):>7.1f} | "
                     f"{row.get('e2e_ratio', nan):>5.2f}x | {row['maxjax_decode_tok_s']:>13.1f} | "
                     f"{row.get('hf_decode_tok_s', nan):>9.1f} | {row.get('decode_ratio', nan):>5.2f}x")
    lines.append(format_ttft(r["ttft"], "maxjax_over_hf", "maxjax/HF {:.2f}"))
    lines.append(f"programs used {r['programs_used']}, compiled on first use in {r['maxjax_first_use_compile_s']:.1f} s; "
                 f"compiles during the timed part: {r['compiles_during_timed_part']}")
    if "cold_start" in r:
        c = r["cold_start"]
        lines.append(f"cold warm-up of every program ({c['programs']}) in a fresh process, empty compile cache: "
                     f"{c['warmup_s']:.1f} s (start to first output {c['start_to_first_output_s']:.1f} s)")
    lines.append(f"load average at start {r['machine']['load_average_start']}, at end {r['machine']['load_average_end']}")
    return "\n".join(lines)


def run_end_to_end(args, argv: list[str] | None) -> dict:
    """--end-to-end: its own defaults (prompt 64 + 64 new tokens; quick: a tiny runtime that queues)."""
    from maxjax.weights.sources import default_gguf

    args.argv = argv if argv is not None else sys.argv[1:]
    gguf = Path(args.model) if args.model else default_gguf()
    runtime = {}
    if args.quick:  # batch 2 through one KV slot: the queue works; scanned layers compile in seconds
        args.batch_sizes, args.prompt_len, args.new_tokens, args.ttft_len = "1,2", 8, 6, 24
        runtime = dict(max_batch_size=1, max_seq_len=32, length_buckets=(32,), max_num_steps=4,
                       scan_decode_layers=True, scan_prefill_layers=True)
    elif "--new-tokens" not in args.argv:
        args.new_tokens = 64
    return end_to_end(args, gguf, runtime)
