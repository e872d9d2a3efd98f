"""Why expert weights are split over each expert's MLP width on a mesh, not over the expert axis.

    python benchmarks/bench_moe_sharding.py            # 4 model shards, 8 and 256 tokens, 5 x 10 timed calls
    python benchmarks/bench_moe_sharding.py --quick    # 8 tokens, 3 x 5 calls
    python benchmarks/bench_moe_sharding.py --json out.json

One mixture-of-experts feed-forward (`maxjax.architectures.moe.sparse_moe`, top-2 of 32 experts of 512 x 256)
with its expert weights laid out three ways on a ("data", "model") mesh of 1 x 4 devices: maxjax's layout
(`llama_sharding.param_spec`: each expert's width split), the expert axis split, and replicated. The figure is
the median milliseconds per call, plus the collectives in each compiled program (all-gathers mean the weights
are copied to every device at each call). On a CPU the script splits the host into 8 devices itself.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from maxjax.architectures import llama, llama_sharding, moe  # noqa: E402
from maxjax.runtime.mesh import mesh_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_families import median_ms  # noqa: E402
from common import quick_json_args, write_json  # noqa: E402

D, F, E, K, TP = 512, 256, 32, 2, 4
KEYS = ("e_gate", "e_up", "e_down")


def layouts(mesh) -> dict[str, list[P]]:
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=F, num_layers=1, num_heads=TP,
                            num_kv_heads=TP, head_dim=8, num_experts=E, num_experts_per_tok=K,
                            moe_intermediate_size=F)
    return {"maxjax (expert width)": [llama_sharding.param_spec(key, 3, cfg, mesh) for key in KEYS],
            "expert axis": [P("model")] * 3, "replicated": [P()] * 3}


def bench(tokens: int, repeats: int, iters: int) -> dict:
    mesh = mesh_of(TP, 1)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, tokens, D)).astype(np.float32)
    router = (0.1 * rng.standard_normal((D, E))).astype(np.float32)
    weights = [(0.05 * rng.standard_normal(shape)).astype(np.float32) for shape in ((E, D, F), (E, D, F), (E, F, D))]
    replicated = NamedSharding(mesh, P())
    out, reference = {}, None
    for name, specs in layouts(mesh).items():
        placed = [jax.device_put(w, NamedSharding(mesh, spec)) for w, spec in zip(weights, specs)]
        step = jax.jit(lambda x, *w: x + 1e-3 * moe.sparse_moe(x, router, *w, K, True, jax.nn.silu),
                       out_shardings=replicated)
        hlo = step.lower(h, *placed).compile().as_text()
        result = np.asarray(step(h, *placed))
        reference = result if reference is None else reference
        np.testing.assert_allclose(result, reference, atol=1e-5)
        out[name] = {"ms": median_ms(lambda x: step(x, *placed), jax.device_put(h, replicated), repeats, iters),
                     "all_gathers": len(re.findall(r"all-gather-start|all-gather\(", hlo)),
                     "all_reduces": len(re.findall(r"all-reduce-start|all-reduce\(", hlo))}
    return out


def main() -> None:
    args = quick_json_args(__doc__)
    token_counts, repeats, iters = ((8,), 3, 5) if args.quick else ((8, 256), 5, 10)
    results = {"machine": f"{jax.devices()[0].platform}, {len(jax.devices())} devices, tp {TP}"}
    for tokens in token_counts:
        results[f"{tokens}_tokens"] = figures = bench(tokens, repeats, iters)
        for name, f in figures.items():
            print(f"{tokens:4d} tokens, experts {name:22s}: {f['ms']:8.2f} ms  "
                  f"all-gathers {f['all_gathers']}, all-reduces {f['all_reduces']}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
