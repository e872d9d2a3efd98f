"""`maxjax run-batch` against `LLM.generate` on the same work: N short chat requests, greedy, each generating
exactly `--max-tokens` tokens (ignore_eos), on one model and runtime (default SmolLM2-135M-Instruct, float32).

Both run in this process, one after the other, each on its own loaded model: `LLM.generate` over the whole
list (the engine's own batching loop), then `run-batch` over a JSONL file of the same requests (the server's
routes and scheduler, in process). Each gets one untimed warm-up round first (compiles); the timed round
excludes loading. Reported: generated tokens/s and requests/s of each, and their ratio.

    python benchmarks/bench_batch.py                 # 1,000 requests, 32 new tokens each
    python benchmarks/bench_batch.py --n 128 --max-tokens 16 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import write_json

QUESTIONS = ["Tell me a story about a dragon.", "Explain how a bicycle works.", "Describe the ocean.",
             "Write a poem about autumn.", "What makes a good friend?", "Explain photosynthesis."]


def messages(n: int) -> list[list[dict]]:
    """N short, distinct chat prompts."""
    return [[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}] for i in range(n)]


def batch_lines(chats: list[list[dict]], model: str, max_tokens: int) -> str:
    return "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "messages": m, "temperature": 0, "max_tokens": max_tokens,
                                        "ignore_eos": True}}) + "\n" for i, m in enumerate(chats))


def bench_llm(model: str | None, runtime: dict, chats: list, max_tokens: int, warmup: int) -> dict:
    from maxjax import LLM

    llm = LLM(model, progress=False, **runtime)
    fields = dict(temperature=0, max_new_tokens=max_tokens, ignore_eos=True, progress=False)
    llm.complete(chats[:warmup], **fields)
    start = time.perf_counter()
    done = llm.complete(chats, **fields)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.tokens) for c in done)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "req_s": len(chats) / seconds}


def bench_run_batch(model: str | None, runtime: dict, chats: list, max_tokens: int, warmup: int) -> dict:
    from maxjax.server.batch import run_batch_with_models
    from maxjax.server.metrics import Metrics
    from maxjax.server.models import load_served_models
    from maxjax.server.scheduler import TextScheduler

    metrics = Metrics()
    models = load_served_models([model] if model else None, runtime, metrics, warmup=False)
    name, served = next(iter(models.items()))
    with tempfile.TemporaryDirectory() as tmp:
        rounds = {"warmup": chats[:warmup], "timed": chats}
        for label, work in rounds.items():
            source, sink = Path(tmp) / f"{label}.jsonl", Path(tmp) / f"{label}.out.jsonl"
            source.write_text(batch_lines(work, name, max_tokens))
            # a scheduler runs one batch: each round gets a fresh one over the same loaded pipeline
            scheduler = TextScheduler(name, served.tokenizer, served.pipeline, metrics)
            round_models = {name: dataclasses.replace(served, scheduler=scheduler)}
            start = time.perf_counter()
            counts = run_batch_with_models(round_models, source, sink, progress=label == "timed")
            seconds = time.perf_counter() - start
            if counts["failed"]:
                raise RuntimeError(f"run-batch: {counts['failed']} failed lines, e.g. {sink.read_text()[:500]}")
        tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                     for line in sink.read_text().splitlines())
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "req_s": len(chats) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="chat requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--model", default=None, help="GGUF/HF/store source (default SmolLM2-135M-Instruct)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-num-steps", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runtime = dict(max_batch_size=args.max_batch_size, max_num_steps=args.max_num_steps,
                   max_seq_len=args.max_seq_len)
    chats = messages(args.n)
    warmup = min(args.n, 2 * args.max_batch_size)
    llm = bench_llm(args.model, runtime, chats, args.max_tokens, warmup)
    batch = bench_run_batch(args.model, runtime, chats, args.max_tokens, warmup)
    print(f"{args.n} chat requests x {args.max_tokens} tokens, max_batch_size {args.max_batch_size}")
    for label, r in [("LLM.generate", llm), ("run-batch", batch)]:
        print(f"  {label:<13} {r['tok_s']:8.1f} tok/s  {r['req_s']:7.2f} req/s  ({r['tokens']} tokens, "
              f"{r['seconds']:.1f} s)")
    print(f"  run-batch / LLM.generate: {batch['tok_s'] / llm['tok_s']:.2f}x")
    write_json(args.json, {"n": args.n, "max_tokens": args.max_tokens, "runtime": runtime, "llm_generate": llm,
                           "run_batch": batch, "ratio": batch["tok_s"] / llm["tok_s"]})


if __name__ == "__main__":
    main()
