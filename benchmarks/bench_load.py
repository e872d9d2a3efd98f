"""Load time and host memory: one device vs a mesh, GGUF vs safetensors vs model store, against the raw read.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_load.py --meshes 1x1,3x1,2x1,3x2

The source (default: the SmolLM2-135M GGUF) is also written, once, as an HF safetensors folder and a model
store of the same float32 params in a temporary folder. Each (source, mesh) load runs in a fresh process
that reports: seconds to read the raw files (page cache warm: every source was just written or read), seconds
from nothing to params on the devices (``load_weights`` + the engine's placement), the host's peak
allocation during it (tracemalloc: numpy and Python buffers; XLA's buffers are not counted, and on forced CPU
devices they are host memory too) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import raw_read_seconds, write_json

HERE = Path(__file__).resolve()


def write_copies(source: Path, folder: Path) -> dict[str, Path]:
    """The source's float32 params as a safetensors folder and a model store."""
    from maxjax.weights import load_weights
    from maxjax.weights.safetensors_dir import save_safetensors_dir
    from maxjax.weights.store import save_store

    weights = load_weights(source, "float32", with_tokenizer=False)
    hf = save_safetensors_dir(folder / "hf", weights.config, weights.params)
    store = save_store(folder / "store", "llama", weights.config, weights.params, None, str(source))
    return {"gguf": source, "hf": hf, "store": store}


def child(spec: dict) -> dict:
    import tracemalloc

    import jax

    from maxjax.architectures import llama, llama_sharding
    from maxjax.runtime.config import RuntimeConfig
    from maxjax.runtime.engine import Engine
    from maxjax.runtime.mesh import make_mesh
    from maxjax.runtime.sharded import restore_shardings
    from maxjax.weights import load_weights

    tp, dp = spec["mesh"]
    config = RuntimeConfig(tensor_parallel=tp, data_parallel=dp, max_batch_size=dp, max_seq_len=128,
                           length_buckets=(128,))
    raw = raw_read_seconds(Path(spec["path"]))
    tracemalloc.start()
    t0 = time.perf_counter()
    mesh = make_mesh(config)
    if mesh is None:  # today's single-device path: the whole tree on the host, then device_put
        weights = load_weights(spec["path"], "float32", with_tokenizer=False)
        params = jax.device_put(weights.params)
    else:
        weights = load_weights(spec["path"], "float32", with_tokenizer=False, lazy=True,
                               store_shardings=lambda cfg: restore_shardings(llama, llama_sharding, cfg, mesh))
        params = weights.params
    engine = Engine(llama, weights.config, params, config, layout=llama_sharding)
    jax.block_until_ready(engine.params)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    return {"raw_read_s": raw, "load_s": seconds, "host_peak_MB": peak / 1e6,
            "rss_peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--meshes", default="1x1,3x1,2x1,3x2", help="TPxDP,... ")
    parser.add_argument("--json", default=None)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    from maxjax.weights.sources import default_gguf

    source = Path(args.model) if args.model else default_gguf()
    meshes = [tuple(int(n) for n in m.split("x")) for m in args.meshes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_copies(source, Path(tmp))
        for kind, path in sources.items():
            for mesh in meshes:
                spec = json.dumps({"path": str(path), "mesh": mesh})
                proc = subprocess.run([sys.executable, str(HERE), "--_child", spec], capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=str(HERE.parents[1])))
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-3000:])
                row = dict(json.loads(proc.stdout.strip().splitlines()[-1]), source=kind, mesh=f"{mesh[0]}x{mesh[1]}")
                results.append(row)
                print(f"{kind:>5} {row['mesh']:>4}: raw read {row['raw_read_s']:6.2f} s, load {row['load_s']:6.2f} s "
                      f"({row['load_s'] / row['raw_read_s']:.1f}x), host peak {row['host_peak_MB']:7.1f} MB, "
                      f"RSS peak {row['rss_peak_MB']:7.1f} MB", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
