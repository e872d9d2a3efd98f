"""Decode on weights kept GGUF-quantized: maxjax ``quantize="gguf"`` vs maxjax float32 vs llama.cpp on the same
file, measured alternately in one process; and the products alone, one matrix stack at a time.

    python benchmarks/bench_quantized.py                 # SmolLM2's Q4_1 file: decode tok/s at batch 1 and 8
    python benchmarks/bench_quantized.py --matmul        # the products only: 30 x [3072, 576] Q4_1, [49152, 576] Q8_0
    python benchmarks/bench_quantized.py --matmul --quick  # tiny shapes (used by the test suite)
    python benchmarks/bench_quantized.py --xla-blocks    # + kept blocks without the native kernel (XLA's products)

Decode tokens/s as ``bench_generate.py`` counts them (``B * (N - 1) / (T(N tokens) - T(1 token))``, greedy,
every row generating exactly ``--new-tokens``), each system timed in turn within every repeat so a busy
machine slows all alike; medians. llama.cpp (``llamacpp_peer.py``) runs only when llama-cpp-python is
installed. ``--matmul`` times ``block_matmul`` (on the CPU: chunks of output channels, 4-bit ones as two
half-dots), the native kernel on the same blocks repacked (``block_panels``, when it can be built) and the
whole matrix dequantized then dotted (the accelerator form) against the float32 dot of the same weights, per
call: wall and process CPU time (CPU time is steadier on a loaded machine).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import MaxjaxRunner  # noqa: E402
from common import decode_rate, make_prompts  # noqa: E402
from machine import load_average  # noqa: E402


def alternate(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (median wall s, median process CPU s)} of each ``fn()``, the names timed in turn per repeat."""
    walls, cpus = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def matmul_stacks(quick: bool) -> list[tuple[str, dict, int]]:
    """(label, GGUF block weight with a leading layer axis, in_features) of SmolLM2's shapes (random bytes)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    layers, out, vocab, d = (2, 256, 1024, 128) if quick else (30, 3072, 49152, 576)
    f16 = lambda *shape: jnp.asarray(rng.uniform(0.001, 0.01, shape).astype(np.float16))  # noqa: E731
    q41 = {"q": jnp.asarray(rng.integers(0, 256, (layers, out, d // 32, 16), dtype=np.uint8)),
           "scale": f16(layers, out, d // 32), "min": -f16(layers, out, d // 32)}
    q80 = {"q": jnp.asarray(rng.integers(-127, 128, (1, vocab, d), dtype=np.int8)), "scale": f16(1, vocab, d // 32)}
    return [(f"{layers} x [{out}, {d}] Q4_1", q41, d), (f"[{vocab}, {d}] Q8_0", q80, d)]


def bench_matmul(batches: list[int], repeats: int, quick: bool) -> list[dict]:
    """Per shape and batch: {form: (wall s, CPU s)} of the same product, after checking the forms agree."""
    import jax
    import jax.numpy as jnp

    from maxjax.architectures import block_panels
    from maxjax.architectures.quantized import block_matmul, dequantize_blocks

    def over_layers(product):  # one product per layer, unrolled over unstacked weights as the serving decoder runs
        return jax.jit(lambda x, ws: jnp.stack([product(x, w) for w in ws]))  # (a scan would copy each layer's slice)

    def unstack(tree):
        return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(jax.tree.leaves(tree)[0].shape[0])]

    rows = []
    for label, w, d in matmul_stacks(quick):
        dense = unstack(jax.jit(jax.vmap(dequantize_blocks))(w))  # [O, D] float32 per layer: the same weights
        for batch in batches:
            x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, d)).astype(np.float32))
            forms = {"float32 dot": (over_layers(lambda x, w: jnp.einsum("nd,od->no", x, w)), dense),
                     "block_matmul": (over_layers(block_matmul), unstack(w)),  # CPU: chunks, 4-bit as two half-dots
                     "dequantize + dot": (over_layers(functools.partial(block_matmul, chunk_elements=1 << 40)),
                                          unstack(w))}
            if block_panels.native.ffi_target(block_panels.Q4_TARGET) is not None:
                forms["native kernel"] = (over_layers(block_panels.block_panel_matmul),
                                          [block_panels.pack(layer) for layer in unstack(w)])
            compiled = {k: (f.lower(x, a).compile(), a) for k, (f, a) in forms.items()}
            expected = np.asarray(compiled["float32 dot"][0](x, dense))
            for name, (c, a) in compiled.items():  # every form computes the same product
                np.testing.assert_allclose(np.asarray(c(x, a)), expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
            times = alternate({k: functools.partial(lambda c, a: c(x, a).block_until_ready(), c, a)
                               for k, (c, a) in compiled.items()}, repeats)
            cells = "  ".join(f"{k} {1e3 * wall:.2f} ms (cpu {1e3 * cpu:.2f})" for k, (wall, cpu) in times.items())
            print(f"{label}, batch {batch}: {cells}  | load {load_average()}", flush=True)
            rows.append({"shape": label, "batch": batch, "times": times})
    return rows


def bench_decode(args) -> None:
    from maxjax.kernels import native
    from maxjax.weights.sources import default_gguf

    gguf = Path(args.model) if args.model else default_gguf()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    P, N = args.prompt_len, args.new_tokens
    span = 1 << (P + N - 1).bit_length()
    fields = dict(max_batch_size=max(batches), batch_buckets=tuple(batches), max_seq_len=span,
                  length_buckets=tuple(sorted({P, span})), max_prefill_len=P, max_num_steps=args.num_steps,
                  max_logprobs=1)
    systems = {"maxjax float32": MaxjaxRunner(gguf, fields).generate,
               "maxjax quantize=gguf": MaxjaxRunner(gguf, dict(fields, quantize="gguf")).generate}
    if args.xla_blocks:  # the same kept blocks, loaded with the native kernels off: XLA's chunked products
        previous, os.environ[native.ENABLE_ENV] = os.environ.get(native.ENABLE_ENV), "0"
        systems["maxjax quantize=gguf, XLA blocks"] = MaxjaxRunner(gguf, dict(fields, quantize="gguf")).generate
        os.environ.pop(native.ENABLE_ENV) if previous is None else os.environ.update({native.ENABLE_ENV: previous})
    vocab = 256 if args.quick else 49152
    try:
        from llamacpp_peer import LlamaCppRunner, llamacpp_available

        if llamacpp_available() and not args.quick:
            systems[f"llama.cpp {gguf.name}"] = LlamaCppRunner(gguf, args.threads, max(batches), span).generate
    except ImportError:
        pass
    print(f"{gguf.name}: prompt {P}, {N} new tokens, {args.num_steps} steps per call, load {load_average()}")
    for batch in batches:
        prompts = make_prompts(batch, P, vocab, seed=batch)
        for generate in systems.values():
            generate(prompts, 2)  # compiles / warms every shape before timing
        full = alternate({k: functools.partial(g, prompts, N) for k, g in systems.items()}, args.repeats)
        first = alternate({k: functools.partial(g, prompts, 1) for k, g in systems.items()}, args.repeats)
        rates = {k: decode_rate(batch, N, full[k][0], first[k][0]) for k in systems}
        cells = "  ".join(f"{k} {rate:.1f}" for k, rate in rates.items())
        print(f"batch {batch}: decode tok/s  {cells}  | load {load_average()}", flush=True)


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--matmul", action="store_true", help="time the products alone")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (no meaningful figures)")
    parser.add_argument("--xla-blocks", action="store_true",
                        help="also time the kept blocks without the native kernel")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.prompt_len, args.new_tokens, args.num_steps = 1, 8, 4, 2
    if args.matmul:
        return bench_matmul([int(b) for b in args.batch_sizes.split(",")], args.repeats, args.quick)
    bench_decode(args)
    return None


if __name__ == "__main__":
    main()
