"""What the family-specific paths save in one decode step, on random weights of a mid-size shape.

    python benchmarks/bench_families.py            # batch 8, 2048-token span, 5 x 10 timed steps
    python benchmarks/bench_families.py --quick    # batch 4, 512-token span, 3 x 5 steps (seconds)
    python benchmarks/bench_families.py --json out.json

* ``sliding``: one decode step of a model whose layers all attend within a 128-token window (sliding layers
  read only their window's cache entries) against the same model attending the whole span; rows sit near
  the end of the span, as in a long conversation.
* ``moe``: one mixture-of-experts feed-forward (top-2 of 32 experts, as routed by maxjax: each token's two
  experts' weights gathered) against computing every expert for every token and weighting the outputs.

Each pair runs the same compiled shapes in one process, alternating, with the KV cache donated as the
serving engine does; the figure is the median milliseconds per step and the ratio between the two.
"""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import quick_json_args, write_json
from maxjax.architectures import llama, moe


def median_ms(step, state, repeats: int, iters: int):
    """Median milliseconds per call of ``state = step(state)`` (after one warm-up call)."""
    state = step(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            state = step(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / iters * 1000)
    return statistics.median(times)


def bench_sliding(batch: int, span: int, repeats: int, iters: int) -> dict:
    shape = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64)
    out = {}
    for name, window in (("whole_span", None), ("window_128", 128)):
        cfg = llama.LlamaConfig(**shape, sliding_window=window)
        params = jax.device_put(llama.unstack_layers(llama.init_params(cfg, jax.random.key(0))))
        tokens = jnp.zeros((batch, 1), jnp.int32)
        positions = jnp.full((batch, 1), span - 100, jnp.int32)
        forward = jax.jit(lambda c, cfg=cfg, params=params: llama.forward(
            params, cfg, tokens, positions, c, jnp.arange(batch, dtype=jnp.int32), kv_len=span)[1],
            donate_argnums=0)
        out[name] = median_ms(forward, llama.init_kv_cache(cfg, batch, span), repeats, iters)
    out["ratio"] = out["whole_span"] / out["window_128"]
    return out


def bench_moe(batch: int, repeats: int, iters: int) -> dict:
    D, F, E, k = 512, 256, 32, 2
    keys = jax.random.split(jax.random.key(1), 5)
    h = jax.random.normal(keys[0], (batch, D))
    router = 0.1 * jax.random.normal(keys[1], (D, E))
    w_gate, w_up = (0.05 * jax.random.normal(key, (E, D, F)) for key in keys[2:4])
    w_down = 0.05 * jax.random.normal(keys[4], (E, F, D))

    @jax.jit
    def routed(x):
        return x + 1e-3 * moe.sparse_moe(x[:, None], router, w_gate, w_up, w_down, k, True, jax.nn.silu)[:, 0]

    @jax.jit
    def every_expert(x):
        weights, experts = moe.route(x, router, k, True)  # [B, k]
        dense = jnp.zeros((x.shape[0], E), x.dtype).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
        outs = jnp.einsum("bef,efd->bed", jax.nn.silu(jnp.einsum("bd,edf->bef", x, w_gate))
                          * jnp.einsum("bd,edf->bef", x, w_up), w_down)  # [B, E, D]
        return x + 1e-3 * jnp.einsum("bed,be->bd", outs, dense)

    np.testing.assert_allclose(routed(h), every_expert(h), atol=1e-5)
    out = {"routed_top2_of_32": median_ms(routed, h, repeats, iters),
           "every_expert": median_ms(every_expert, h, repeats, iters)}
    out["ratio"] = out["every_expert"] / out["routed_top2_of_32"]
    return out


def main() -> None:
    args = quick_json_args(__doc__)
    batch, span, repeats, iters = (4, 512, 3, 5) if args.quick else (8, 2048, 5, 10)
    results = {"machine": f"{platform.machine()}, {jax.devices()[0].platform}", "batch": batch, "span": span,
               "sliding": bench_sliding(batch, span, repeats, iters), "moe": bench_moe(batch, repeats, iters)}
    s, m = results["sliding"], results["moe"]
    print(f"sliding-window decode step, batch {batch}, span {span}: whole span {s['whole_span']:.2f} ms, "
          f"window 128 {s['window_128']:.2f} ms ({s['ratio']:.2f}x)")
    print(f"MoE feed-forward, batch {batch} tokens: top-2 of 32 routed {m['routed_top2_of_32']:.3f} ms, "
          f"every expert {m['every_expert']:.3f} ms ({m['ratio']:.2f}x)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
