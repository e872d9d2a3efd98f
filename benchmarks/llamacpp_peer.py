"""llama.cpp as the CPU peer of bench_generate.py (``--llamacpp``): the same GGUF file as users run it (its own
4-bit blocks) and an F32 copy written from the same weights, so both speeds sit beside maxjax's in one run.

llama.cpp comes from ``llama-cpp-python``, which pip builds from source (minutes on 2 cores), so it is an
optional extra (``pip install -e ".[bench-llamacpp]"``) and the benchmark says how to get it when missing.
Measured like maxjax's rows, every system's timed calls alternating: greedy (argmax of the logits), decode
tokens/s ``B (N - 1) / (T(N) - T(1))``, 8 sequences decoded together in one ``llama_batch`` per step, time to
first token of one long prompt.

bench_generate.py needs three calls: ``llamacpp_comparison`` (every figure, the JSON's
``llamacpp_comparison``), ``format_peer_table`` (its lines of the printed table) and ``f32_read_rate`` (the
memory bandwidth llama.cpp's F32 decode reaches, for the roofline).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from common import TTFT_ROUNDS, alternating_medians, decode_rate, same_tokens

INSTALL_HINT = ("llama.cpp is not installed: pip install llama-cpp-python (builds llama.cpp from source, several "
                "minutes), or pip install -e \".[bench-llamacpp]\"; then rerun with --llamacpp")


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def f32_copy(gguf_path: Path, cache_dir: Path) -> Path:
    """An F32 GGUF of ``gguf_path``: the same metadata and tensors, every block dequantized. Written once
    into ``cache_dir`` (then reused): the bytes a float32 runtime reads, in llama.cpp's own format."""
    import gguf

    out = Path(cache_dir) / f"{gguf_path.stem}.F32.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(gguf_path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, weights, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


class LlamaCppRunner:
    """One GGUF file in llama.cpp: ``n_seq`` sequences of up to ``seq_len`` tokens, ``threads`` threads."""

    def __init__(self, path: Path, threads: int, n_seq: int, seq_len: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq_len, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_seq * seq_len, n_seq * seq_len, 512
        params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, threads, threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)  # a context for n_seq rows
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_seq} x {seq_len} tokens")
        self.vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_seq * seq_len, 0, n_seq)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.llm.close()

    def _clear(self) -> None:
        lib = self.lib
        if hasattr(lib, "llama_get_memory"):
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        else:
            lib.llama_kv_self_clear(self.ctx)

    def _decode(self, rows: list[list[int]], start: int) -> np.ndarray:
        """One llama_decode of ``rows`` (row i is sequence i, positions from ``start``); argmax of each row's
        last logits."""
        b, n = self.batch, 0
        for seq, tokens in enumerate(rows):
            for j, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = token, start + j, 1
                b.seq_id[n][0], b.logits[n] = seq, j == len(tokens) - 1
                n += 1
        b.n_tokens = n
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out, last = np.empty(len(rows), np.int64), -1
        for seq, tokens in enumerate(rows):
            last += len(tokens)
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, last), shape=(self.vocab,))
            out[seq] = int(np.argmax(logits))
        return out

    def generate(self, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy ``new_tokens`` for each prompt row ([B, P] ids), all rows decoded together."""
        self._clear()
        tokens = [self._decode([list(map(int, row)) for row in prompts], 0)]
        for step in range(1, new_tokens):
            tokens.append(self._decode([[int(t)] for t in tokens[-1]], prompts.shape[1] + step - 1))
        return np.stack(tokens, axis=1)


def peer_figures(systems: dict[str, Callable], prompts: dict[int, np.ndarray], new_tokens: int,
                 ttft_prompt: np.ndarray, repeats: int) -> dict[str, dict]:
    """Decode tokens/s per batch size and the time to first token of ``ttft_prompt`` for each of ``systems``
    ({label: generate}, each ``generate(prompts, n)`` greedy to n new tokens; the first call of each shape is not
    timed). The systems' timed calls alternate, one call each in turn, so that a drift in the machine's speed
    during the run (its memory bandwidth moves by 10-30% over minutes on a shared VM) falls on all of them alike;
    at least 3 rounds (5 for the time to first token, the noisiest figure) of medians: one call of each is a
    single sample of a drifting machine."""
    rounds = max(3, repeats)
    out = {label: {"decode_tok_s": {}} for label in systems}
    for batch, rows in prompts.items():
        for generate in systems.values():
            generate(rows, 2)
        full = alternating_medians({k: lambda g=g: g(rows, new_tokens) for k, g in systems.items()}, rounds)
        first = alternating_medians({k: lambda g=g: g(rows, 1) for k, g in systems.items()}, rounds)
        for label in systems:
            out[label]["decode_tok_s"][batch] = decode_rate(len(rows), new_tokens, full[label], first[label])
    for generate in systems.values():
        generate(ttft_prompt, 1)
    ttft = alternating_medians({k: lambda g=g: g(ttft_prompt, 1) for k, g in systems.items()}, max(TTFT_ROUNDS, rounds))
    for label in systems:
        out[label]["ttft_s"] = ttft[label]
    return out


def llamacpp_comparison(gguf: Path, maxjax: Callable, maxjax_blocks: Callable[[], Callable],
                        prompts: dict[int, np.ndarray], ttft_prompt: np.ndarray, *, new_tokens: int, repeats: int,
                        threads: int, cache_dir: Path, float32_single_device: bool) -> dict:
    """bench_generate's ``--llamacpp``: llama.cpp on the file and on its F32 copy (written once under
    ``cache_dir``), maxjax float32 (``maxjax``: its greedy ``generate``) and maxjax on the file's blocks
    (``maxjax_blocks()`` loads it), measured alike and alternating (`peer_figures`) at batch 1 and 8 of
    ``prompts``; each llama.cpp file's greedy tokens beside maxjax float32's (the F32 copy must agree; 4-bit
    blocks may drift). Without llama.cpp, or where maxjax does not run float32 on one device from a GGUF file,
    says why instead."""
    if not llamacpp_available():
        print(INSTALL_HINT, file=sys.stderr, flush=True)
        return {"missing": INSTALL_HINT}
    if Path(gguf).suffix != ".gguf" or not float32_single_device:
        return {"skipped": "llama.cpp runs a float32 single-device comparison on a GGUF --model"}
    peer = {b: p for b, p in prompts.items() if b in (1, 8)} or {min(prompts): prompts[min(prompts)]}
    reference = np.array(list(maxjax(peer[min(peer)], new_tokens).values()))
    files = {"f32": f32_copy(Path(gguf), Path(cache_dir) / "f32"), "q4": Path(gguf)}
    seq_len = max(peer[max(peer)].shape[1] + new_tokens, ttft_prompt.shape[1] + 1)
    labels = {"f32": "llama.cpp F32 copy", "q4": f"llama.cpp {Path(gguf).name}"}
    runners = {}
    try:
        for key, path in files.items():
            runners[key] = LlamaCppRunner(path, threads, max(peer), 1 << (seq_len - 1).bit_length())
        systems = {"maxjax float32": maxjax, "maxjax quantize=gguf (blocks kept)": maxjax_blocks(),
                   **{labels[key]: runner.generate for key, runner in runners.items()}}
        rows = peer_figures(systems, peer, new_tokens, ttft_prompt, repeats)
        cpp = {"threads": threads}
        for key, runner in runners.items():
            same = same_tokens(runner.generate(peer[min(peer)], reference.shape[1]), reference)
            cpp[key] = dict(rows[labels[key]], file=str(files[key]), file_bytes=files[key].stat().st_size,
                            greedy_same_tokens_as_maxjax=same)
            rows[labels[key]] = cpp[key]
    finally:
        for runner in runners.values():
            runner.close()
    return {"llamacpp": cpp, "rows": rows, "ttft_len": int(ttft_prompt.shape[1]),
            "ratios_of": {"maxjax float32 / llama.cpp F32": ("maxjax float32", labels["f32"]),
                          "maxjax gguf blocks / llama.cpp file": ("maxjax quantize=gguf (blocks kept)",
                                                                  labels["q4"])}}


def f32_read_rate(comparison: dict) -> float | None:
    """Bytes/s llama.cpp's batch-1 decode of the F32 copy reads (file bytes x tokens/s): memory bandwidth that a
    real decode reaches, beside the read kernels of machine.py (None without a batch-1 figure)."""
    f32 = comparison["llamacpp"]["f32"]
    return f32["file_bytes"] * f32["decode_tok_s"][1] if 1 in f32["decode_tok_s"] else None


def format_peer_table(r: dict) -> list[str]:
    """The llama.cpp comparison as lines of bench_generate's table (or why there is none)."""
    if "rows" not in r:
        return [f"llama.cpp: {r.get('missing') or r['skipped']}"]
    cols = sorted({int(b) for fig in r["rows"].values() for b in fig["decode_tok_s"]})
    lines = [f"llama.cpp peer ({r['llamacpp']['threads']} threads) on the same weights: decode tok/s and time to first"
             f" token ({r['ttft_len']}-token prompt)",
             f"{'system':<34} | " + " | ".join(f"{'batch ' + str(b):>9}" for b in cols) + f" | {'TTFT ms':>8}"]
    for label, fig in r["rows"].items():
        rates = " | ".join(f"{fig['decode_tok_s'].get(b, float('nan')):>9.1f}" for b in cols)
        lines.append(f"{label:<34} | {rates} | {fig['ttft_s'] * 1e3:>8.0f}")
    for label, (ours, theirs) in r["ratios_of"].items():
        a, b = r["rows"][ours], r["rows"][theirs]
        ratio = " ".join(f"batch {c}: {a['decode_tok_s'][c] / b['decode_tok_s'][c]:.2f}x" for c in cols
                         if c in a["decode_tok_s"] and c in b["decode_tok_s"])
        lines.append(f"{label}: {ratio}, TTFT {b['ttft_s'] / a['ttft_s']:.2f}x (above 1: maxjax faster)")
    for key in ("f32", "q4"):
        if key in r["llamacpp"]:
            lines.append(f"llama.cpp {key} greedy tokens equal to maxjax float32: "
                         f"{r['llamacpp'][key]['greedy_same_tokens_as_maxjax'] * 100:.0f}%")
    return lines
