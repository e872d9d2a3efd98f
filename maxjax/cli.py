"""The ``maxjax`` command: generate | chat | embed | speak | convert | bench."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (defaults: greedy)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=1, help="1 = greedy, 0 = no limit")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file, HF folder or model-store name "
                                                      "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tensor-parallel", type=int, default=1, help="devices splitting heads, MLP, vocabulary")
    parser.add_argument("--data-parallel", type=int, default=1, help="devices splitting the batch / KV slots")


def _sampling_params(args):
    from maxjax.interfaces import SamplingParams

    return SamplingParams(
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, temperature=args.temperature,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos, stop=args.stop, seed=args.seed)


def _load_llm(args, max_batch_size: int = 1):
    from maxjax.pipelines.llm import LLM

    start = time.perf_counter()
    llm = LLM(args.model, chat=not getattr(args, "raw", False),
              max_batch_size=max(max_batch_size, args.data_parallel),  # every "data" shard holds a slot
              max_seq_len=args.max_seq_len, dtype=args.dtype, tensor_parallel=args.tensor_parallel,
              data_parallel=args.data_parallel)
    print(f"[maxjax] loaded {llm.pipeline.model_name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return llm


def _request_fields(args) -> dict:
    fields = {}
    if getattr(args, "logprobs", 0):
        fields["logprobs"] = args.logprobs
    if getattr(args, "json_schema", None):
        schema = json.loads(Path(args.json_schema).read_text())
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return fields


def cmd_generate(args) -> int:
    params = _sampling_params(args)  # bad flags fail before the model loads
    fields = _request_fields(args)
    llm = _load_llm(args)
    start = time.perf_counter()
    if fields.get("logprobs"):
        completion = llm.complete([args.prompt], params, **fields)[0]
        print(completion.text)
        for step, lp in enumerate(completion.log_probabilities or []):
            top = ", ".join(f"{llm.tokenizer.decode_tokens([t])!r}: {v:.3f}"
                            for t, v in lp.top_log_probabilities[0].items())
            print(f"  [{step}] {lp.token_log_probabilities[0]:.4f}  top: {top}")
        count = len(completion.tokens)
    else:
        for piece in llm.stream(args.prompt, params, **fields):
            print(piece, end="", flush=True)
        print()
        count = llm.last_num_tokens
    elapsed = time.perf_counter() - start
    print(f"[maxjax] {count} tokens in {elapsed:.2f} s (first call includes compilation; "
          f"{llm.pipeline.engine.num_programs} programs compiled)", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("[maxjax] chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        reply = "".join(print(p, end="", flush=True) or p for p in llm.stream(messages, params))
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    from maxjax.pipelines.embeddings import embed

    vectors = embed(args.texts, model=args.model)
    if len(args.texts) == 1:
        print(json.dumps([round(float(x), 6) for x in vectors[0]]))
        return 0
    sims = vectors @ vectors.T  # rows are L2-normalised: cosine similarity
    width = max(len(t) for t in args.texts[:20])
    print("cosine similarity")
    for text, row in zip(args.texts, np.asarray(sims)):
        print(f"{text[:40]:<{min(width, 40)}}  " + "  ".join(f"{x:6.3f}" for x in row))
    return 0


def cmd_speak(args) -> int:
    from maxjax.pipelines.audio import speak_to_file

    info = speak_to_file(args.text, args.output, model=args.model, voice=args.voice)
    print(json.dumps(info, default=str), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from maxjax.weights import convert_to_store

    start = time.perf_counter()
    path = convert_to_store(args.source, args.name, models_dir=args.models_dir, dtype=args.dtype,
                            overwrite=args.overwrite)
    print(f"[maxjax] wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_bench(args, extra: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    if not script.is_file():
        print(f"maxjax bench needs the repository's benchmarks/ folder ({script} not found)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion for one prompt")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--logprobs", type=int, default=0, help="print the top-N log-probabilities of each token")
    p.add_argument("--json-schema", default=None, help="constrain the output to this JSON schema file")
    _model_args(p)
    _sampling_args(p)

    p = sub.add_parser("chat", help="multi-turn chat with the model's chat template")
    p.add_argument("--system", default=None)
    _model_args(p)
    _sampling_args(p)

    p = sub.add_parser("embed", help="sentence embeddings, or their cosine similarities for 2+ texts")
    p.add_argument("texts", nargs="+")
    p.add_argument("--model", default=None, help="sentence-transformers/BERT folder (default: all-MiniLM-L6-v2)")

    p = sub.add_parser("speak", help="text to speech into a 24 kHz WAV file")
    p.add_argument("text")
    p.add_argument("-o", "--output", default="speech.wav")
    p.add_argument("--model", default=None, help="Orpheus model folder (default: small random weights)")
    p.add_argument("--voice", default=None)

    p = sub.add_parser("convert", help="convert a GGUF/HF model into the local model store")
    p.add_argument("source")
    p.add_argument("--name", required=True)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")

    sub.add_parser("bench", help="benchmarks/bench_generate.py (pass its flags after 'bench')", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] == "bench":
        return cmd_bench(None, argv[1:])
    args = parser.parse_args(argv)
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "embed": cmd_embed, "speak": cmd_speak,
                "convert": cmd_convert}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"maxjax {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
