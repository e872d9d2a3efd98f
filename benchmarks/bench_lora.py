"""LoRA serving speed: decode tokens/s at batch 8 with every row on the base model, every row on one adapter,
and the rows spread over 4 adapters (one batch, one compiled program), next to the same runtime with LoRA off.

    python benchmarks/bench_lora.py                  # SmolLM2-135M GGUF, float32, rank-16 adapters, 7 projections
    python benchmarks/bench_lora.py --quick          # a few tokens (a smoke run, no meaningful figures)
    python benchmarks/bench_lora.py --rank 8 --json out.json

Adapters are random PEFT-format folders (adapter_config.json + adapter_model.safetensors) written for the
model's shapes. Greedy, no eos: every row generates exactly ``--new-tokens`` after a ``--prompt-len`` prompt,
through ``next_token`` with multi-step decode. Decode tokens/s = ``B * (N - 1) / (T(N tokens) - T(1 token))``
(prefill not counted), as in bench_generate.py. Modes are measured in turn, ``--rounds`` times, and each
keeps its median round (load bursts on a shared machine hit single rounds). The mixed-adapter cost is the
4-adapter figure against the one-adapter figure; the cost of LoRA itself is either against LoRA off.
Compiles during the timed part must be 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_rate, make_prompts, write_json  # noqa: E402
from machine import load_average  # noqa: E402


def write_random_adapter(folder: Path, cfg, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder with random A and B on every projection of every layer (rank ``rank``)."""
    from safetensors.numpy import save_file

    from maxjax.weights.lora import MLP_MODULES, MODULE_SHAPES

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in MODULE_SHAPES:
            d_in, d_out = MODULE_SHAPES[module](cfg)
            group = "mlp" if module in MLP_MODULES else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (0.01 * rng.standard_normal((d_out, rank))).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULE_SHAPES),
              "bias": "none", "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def generate(pipe, prompts: np.ndarray, lora_names: list, new_tokens: int, num_steps: int) -> float:
    """Runs every row to ``new_tokens`` tokens; returns the wall time."""
    from maxjax.context import TextContext
    from maxjax.interfaces import SamplingParams, TextGenerationInputs

    live = {f"r{i}": TextContext(f"r{i}", row, max_length=len(row) + new_tokens, lora_name=name,
                                 sampling_params=SamplingParams(top_k=1))
            for i, (row, name) in enumerate(zip(prompts, lora_names))}
    start = time.perf_counter()
    while live:
        for rid, out in pipe.next_token(TextGenerationInputs(dict(live), num_steps)).items():
            if out.is_done:
                pipe.release(rid)
                del live[rid]
    return time.perf_counter() - start


def decode_tokens_per_s(pipe, prompts, lora_names, new_tokens, num_steps) -> float:
    t1 = generate(pipe, prompts, lora_names, 1, num_steps)
    tn = generate(pipe, prompts, lora_names, new_tokens, num_steps)
    return decode_rate(len(prompts), new_tokens, tn, t1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF / HF folder / store name (default: SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="modes measured in turn this many times; median kept")
    parser.add_argument("--quick", action="store_true", help="a few tokens (a smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from maxjax.pipelines.registry import load_text_pipeline
    from maxjax.runtime.compile_cache import compile_count

    model = args.model
    if args.quick:
        args.prompt_len, args.new_tokens, args.num_steps = 8, 8, 4
    max_seq_len = 1 << (args.prompt_len + args.new_tokens - 1).bit_length()
    runtime = dict(max_batch_size=args.batch, batch_buckets=(args.batch,), max_seq_len=max_seq_len,
                   length_buckets=(max_seq_len,), max_num_steps=args.num_steps)
    load_average_start = load_average()
    tokenizer, off = load_text_pipeline(model, **runtime)
    cfg = off.engine.model_config
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    names = [f"a{i}" for i in range(4)]
    adapters = {name: write_random_adapter(folder / name, cfg, args.rank, seed=i) for i, name in enumerate(names)}
    _, pipe = load_text_pipeline(model, lora_adapters=adapters, **runtime)
    prompts = make_prompts(args.batch, args.prompt_len, cfg.vocab_size, seed=0)
    modes = {"lora off": (off, [None] * args.batch), "base rows": (pipe, [None] * args.batch),
             "1 adapter": (pipe, [names[0]] * args.batch),
             "4 adapters": (pipe, [names[i % 4] for i in range(args.batch)])}
    for mode_pipe, lora_names in modes.values():  # compile everything before the timed part
        generate(mode_pipe, prompts, lora_names, 2, args.num_steps)
    compiles_before = compile_count()
    # Modes take turns, the median round per mode: on a shared machine load bursts hit rounds, not one mode.
    rounds = [{mode: decode_tokens_per_s(p, prompts, lora_names, args.new_tokens, args.num_steps)
               for mode, (p, lora_names) in modes.items()} for _ in range(args.rounds)]
    figures = {mode: float(np.median([r[mode] for r in rounds])) for mode in modes}
    result = {"model": pipe.model_name, "batch": args.batch, "rank": args.rank, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "num_steps": args.num_steps, "decode_tok_s": figures, "rounds": rounds,
              "mixed_vs_one_adapter": figures["4 adapters"] / figures["1 adapter"],
              "one_adapter_vs_lora_off": figures["1 adapter"] / figures["lora off"],
              "compiles_during_timed_part": compile_count() - compiles_before,
              "load_average_start": load_average_start}
    print(f"{result['model']}: batch {args.batch}, rank {args.rank} on all 7 projections, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.num_steps} steps per call")
    for mode, value in figures.items():
        print(f"  {mode:>10}: {value:8.1f} decode tok/s")
    print(f"  4 adapters / 1 adapter: {result['mixed_vs_one_adapter']:.3f}; 1 adapter / LoRA off: "
          f"{result['one_adapter_vs_lora_off']:.3f}; compiles during the timed part: "
          f"{result['compiles_during_timed_part']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
