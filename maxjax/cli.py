"""The ``maxjax`` command: generate | chat | embed | speak | serve | run-batch | convert | bench.

Every command that loads a model takes ``--model`` (a path, a model-store name or a built-in short name:
``smollm2``, ``minilm``); the runtime flags (``_runtime_args``) are shared by generate, chat and serve, so they
have the same names, defaults and checks everywhere.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

CHAT_EXITS = ("", "exit", "quit", "/exit", "/quit")
DESCRIPTION = ("maxjax: generate, chat, embed, speak, serve, convert, bench. Run 'maxjax COMMAND --help' for the "
               "flags of a command. --model takes a GGUF file, an HF folder, a model-store name or a built-in "
               "short name (smollm2, minilm).")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


SAMPLING_RULE = ("default greedy; --temperature, --top-p or --min-p without --top-k samples from the whole "
                 "vocabulary (top-k 0), as HF and vLLM do")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling", SAMPLING_RULE)
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--min-new-tokens", type=int, default=0, help="tokens generated before EOS or a stop may end")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1 when sampling)")
    g.add_argument("--top-k", type=int, default=None, help="1 = greedy, 0 = no limit (default: 1, or 0 when "
                                                           "--temperature/--top-p/--min-p is given)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens whose "
                                                             "probabilities sum to P (default 1: off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below P x the top token's probability "
                                                             "(default 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="divides the logits of tokens already "
                                                                         "seen (1 = off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per earlier occurrence")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once a token occurred")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    """--model, the runtime flags, and --lora-name (the adapter a generate/chat uses)."""
    parser.add_argument("--model", default=None, help="GGUF file, HF folder, model-store name or built-in name "
                                                      "(default: smollm2, SmolLM2-135M-Instruct Q4_1)")
    _runtime_args(parser)
    parser.add_argument("--lora-name", default=None, help="generate with this adapter (default: the first --lora)")
    _quiet_arg(parser)


def _quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines while the model loads")


def _runtime_args(parser: argparse.ArgumentParser) -> None:
    """The runtime flags of generate, chat and serve (one definition: same names, defaults and checks)."""
    _kv_cache_args(parser)
    g = parser.add_argument_group("runtime", "how the model runs (see maxjax.runtime.config.RuntimeConfig)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="weights and activations; auto: bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                   help="float32 dot precision (default: highest for float32; 'default' allows TF32 on GPU)")
    g.add_argument("--quantize", default=None, choices=["int8", "gguf"],
                   help="int8: weight-only int8; gguf: keep a GGUF file's quantized blocks on the device "
                        "(default: none, weights in --dtype)")
    g.add_argument("--tensor-parallel", type=int, default=1, help="devices splitting heads, MLP, vocabulary")
    g.add_argument("--data-parallel", type=int, default=1, help="devices splitting the batch / KV slots")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="load the PEFT LoRA adapter folder PATH as NAME (repeatable; serve: a model name of its "
                        "own, on the first text model)")
    g.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="speculative decoding: n-gram prompt lookup, or a --draft-model (default: off)")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="drafts verified per step (K)")
    g.add_argument("--draft-model", default=None, help="draft model for --speculative draft (same vocabulary)")


def _server_runtime_args(parser: argparse.ArgumentParser) -> None:
    """serve's and run-batch's runtime: batching and buckets, then the flags generate takes (``_runtime_args``)."""
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="sequences held and decoded together (default 32)")
    parser.add_argument("--max-num-steps", type=int, default=8, help="decode steps per device call")
    parser.add_argument("--length-buckets", default=None, help="comma-separated attention spans compiled for, e.g. "
                        "128,512,2048 (default: powers of two up to --max-seq-len)")
    _runtime_args(parser)


def _kv_cache_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KV cache", "a pool of pages; a sequence holds the pages its tokens fill")
    g.add_argument("--max-seq-len", type=int, default=None, help="longest sequence (default: the model's limit)")
    g.add_argument("--page-size", type=int, default=None, help="positions per KV cache page (default 64)")
    g.add_argument("--num-pages", type=int, default=None, help="pages in the pool (default: from the budget)")
    g.add_argument("--kv-cache-memory", type=float, default=None, metavar="GB",
                   help="KV cache budget in GB (default: 32 sequences of 1k tokens on a CPU, half the free memory "
                        "of a GPU/TPU)")
    g.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float8_e4m3fn"],
                   help="KV cache dtype (default: the model's); bfloat16 / float8 hold 2x / 4x the tokens")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the KV pages of common prompt prefixes between requests")


def _kv_runtime(args) -> dict:
    """The RuntimeConfig fields the KV cache flags set (the rest keep their defaults)."""
    runtime = {"max_seq_len": args.max_seq_len, "page_size": args.page_size, "num_pages": args.num_pages,
               "kv_cache_memory": None if args.kv_cache_memory is None else int(args.kv_cache_memory * 1e9),
               "kv_cache_dtype": args.kv_cache_dtype}
    runtime = {k: v for k, v in runtime.items() if v is not None}
    if args.no_prefix_caching:
        runtime["prefix_caching"] = False
    return runtime


def _runtime(args) -> dict:
    """The RuntimeConfig fields the runtime flags set (``_runtime_args``), KV cache flags included."""
    return {**_kv_runtime(args), "dtype": args.dtype, "matmul_precision": args.matmul_precision,
            "quantize": args.quantize, "tensor_parallel": args.tensor_parallel, "data_parallel": args.data_parallel,
            "speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens}


def _lora_adapters(args) -> dict[str, str]:
    adapters = {}
    for spec in args.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {spec!r}: expected NAME=PATH")
        if name in adapters:
            raise ValueError(f"--lora {spec!r}: adapter name {name!r} given twice")
        adapters[name] = path
    return adapters


def _sampling_params(args):
    from maxjax.pipelines.llm import resolve_sampling

    given = dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, temperature=args.temperature)
    return resolve_sampling(
        **{k: v for k, v in given.items() if v is not None},
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos, stop=args.stop, seed=args.seed)


def _load_llm(args, max_batch_size: int = 1):
    from maxjax.pipelines.llm import LLM

    return LLM(args.model, chat=not getattr(args, "raw", False), progress=not args.quiet,
               max_batch_size=max(max_batch_size, args.data_parallel),  # every "data" shard holds a slot
               **_runtime(args), lora_adapters=_lora_adapters(args),
               draft_model=args.draft_model)  # LLM reports loading on stderr


def _read_json_schema(path: str) -> dict:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--json-schema {path}: cannot read a JSON schema ({error})") from error
    if not isinstance(schema, dict):
        raise ValueError(f"--json-schema {path}: a JSON schema is an object, got a {type(schema).__name__}")
    from maxjax.pipelines.structured import check_json_schema

    try:
        check_json_schema(schema)  # valid JSON that is not a usable schema fails here, before the model loads
    except ValueError as error:
        raise ValueError(f"--json-schema {path}: {error}") from None
    return schema


def _request_fields(args) -> dict:
    fields = {}
    lora_name = args.lora_name or next(iter(_lora_adapters(args)), None)
    if lora_name:
        fields["lora_name"] = lora_name
    if getattr(args, "logprobs", 0):
        fields["logprobs"] = args.logprobs
    if getattr(args, "json_schema", None):
        schema = _read_json_schema(args.json_schema)
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return fields


def _compile_note(compiled_before: int, hits_before: int) -> str:
    """What the call really did about programs: compiled now, loaded from the compile cache, or neither."""
    from maxjax.runtime.compile_cache import cache_hit_count, compile_count

    hits = cache_hit_count() - hits_before
    fresh = compile_count() - compiled_before - hits
    if not fresh and not hits:
        return "no compilation"
    return f"{fresh} programs compiled, {hits} loaded from the compile cache"


def cmd_generate(args) -> int:
    from maxjax.interfaces import GenerationStatus
    from maxjax.runtime.compile_cache import cache_hit_count, compile_count

    if not args.prompt.strip():
        raise ValueError("prompt is empty (or only whitespace)")
    params = _sampling_params(args)  # bad input fails before the model loads
    fields = _request_fields(args)
    llm = _load_llm(args)
    compiled_before, hits_before = compile_count(), cache_hit_count()
    start = time.perf_counter()
    if fields.get("logprobs"):
        completion = llm.complete([args.prompt], params, **fields)[0]
        print(completion.text)
        for step, lp in enumerate(completion.log_probabilities or []):
            top = ", ".join(f"{llm.tokenizer.decode_tokens([t])!r}: {v:.3f}"
                            for t, v in lp.top_log_probabilities[0].items())
            print(f"  [{step}] {lp.token_log_probabilities[0]:.4f}  top: {top}")
        count, status = len(completion.tokens), completion.final_status
    else:
        for piece in llm.stream(args.prompt, params, **fields):
            print(piece, end="", flush=True)
        print()
        count, status = llm.last_num_tokens, llm.last_status
    elapsed = time.perf_counter() - start
    print(f"[maxjax] {count} tokens in {elapsed:.2f} s ({_compile_note(compiled_before, hits_before)})",
          file=sys.stderr)
    if status is GenerationStatus.MAXIMUM_LENGTH:
        print(f"[maxjax] stopped at the length limit after {count} tokens (--max-new-tokens {args.max_new_tokens}, "
              f"--max-seq-len {args.max_seq_len or 'at the model limit'}): the text may be cut short", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    fields = _request_fields(args)
    llm = _load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("[maxjax] chat: 'exit', 'quit', an empty line, Ctrl-D or Ctrl-C to leave", file=sys.stderr)
    try:
        while True:
            line = input("you> ").strip()
            if line.lower() in CHAT_EXITS:
                break
            messages.append({"role": "user", "content": line})
            print("model> ", end="", flush=True)
            reply = "".join(print(p, end="", flush=True) or p for p in llm.stream(messages, params, **fields))
            print()
            messages.append({"role": "assistant", "content": reply})
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    from maxjax.pipelines.embeddings import embed_texts, load_embeddings_pipeline

    tokenizer, pipeline = load_embeddings_pipeline(args.model, progress=not args.quiet)
    vectors = embed_texts(tokenizer, pipeline, args.texts)
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

    if not args.text.strip():
        raise ValueError("text is empty (or only whitespace)")
    info = speak_to_file(args.text, args.output, model=args.model, voice=args.voice, progress=not args.quiet)
    print(f"[maxjax] wrote {Path(info['path']).resolve()} ({info['duration_s']:.2f} s of audio at "
          f"{info['sample_rate']} Hz)", file=sys.stderr)
    print(json.dumps(info, default=str))
    return 0


def _has_serve_extra(command: str) -> bool:
    """Whether the HTTP stack (the ``serve`` extra) imports; says how to install it when not."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        print(f"maxjax {command} needs the serve extra (pip install 'maxjax[serve]'): {error}", file=sys.stderr)
        return False
    return True


def cmd_serve(args) -> int:
    if not _has_serve_extra("serve"):
        return 2
    from maxjax.server.main import serve

    runtime = _server_runtime(args)
    return serve(args.model, host=args.host, port=args.port, runtime=runtime, warmup=not args.no_warmup,
                 drain_timeout=args.drain_timeout, log_level=args.log_level, lora_adapters=_lora_adapters(args))


def _server_runtime(args) -> dict:
    """The runtime of serve and run-batch (``_server_runtime_args``), checked as generate checks its flags, before
    the port opens or a model loads."""
    runtime = {**_runtime(args), "max_num_steps": args.max_num_steps}
    if args.max_batch_size is not None:  # else the pipeline's default: as many slots as the memory holds
        runtime["max_batch_size"] = args.max_batch_size
    if args.length_buckets:
        try:
            runtime["length_buckets"] = tuple(int(b) for b in args.length_buckets.split(","))
        except ValueError:
            raise ValueError(f"--length-buckets {args.length_buckets!r}: expected integers separated by commas, "
                             "e.g. 128,512,2048") from None
    if args.draft_model is not None:
        runtime["draft_model"] = args.draft_model
    _check_runtime(runtime)
    return runtime


def _check_runtime(runtime: dict) -> None:
    """RuntimeConfig's own checks on the flags, and draft_model iff speculative='draft', as load_text_pipeline
    applies them; raises ValueError naming the flag's field."""
    from maxjax.runtime.config import RuntimeConfig

    fields = {k: v for k, v in runtime.items() if k != "draft_model"}
    RuntimeConfig(**fields)
    if ("draft_model" in runtime) != (fields.get("speculative") == "draft"):
        raise ValueError(f"draft_model is needed with speculative='draft' and only then (--speculative "
                         f"{fields.get('speculative')}, --draft-model {runtime.get('draft_model')})")


def cmd_run_batch(args) -> int:
    if not _has_serve_extra("run-batch"):
        return 2
    from maxjax.server.batch import run_batch

    runtime = _server_runtime(args)
    counts = run_batch(args.input_file, args.output_file, args.model, runtime=runtime, warmup=args.warmup,
                       progress=not args.quiet, lora_adapters=_lora_adapters(args))
    print(f"[maxjax] {counts['lines']} lines: {counts['ok']} ok, {counts['failed']} failed -> {args.output_file}",
          file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from maxjax.weights import convert_to_store, resolve_source

    start = time.perf_counter()
    name = args.name or resolve_source(args.source).name
    path = convert_to_store(args.source, name, models_dir=args.models_dir, dtype=args.dtype,
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
    parser = argparse.ArgumentParser(prog="maxjax", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="stream a completion for one prompt", formatter_class=HelpFormatter)
    p.add_argument("prompt", help="the prompt (sent through the model's chat template unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--logprobs", type=int, default=0, help="print the top-N log-probabilities of each token")
    p.add_argument("--json-schema", default=None, help="constrain the output to this JSON schema file")
    _model_args(p)
    _sampling_args(p)

    p = sub.add_parser("chat", help="multi-turn chat with the model's chat template", formatter_class=HelpFormatter)
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    _model_args(p)
    _sampling_args(p)

    p = sub.add_parser("embed", help="sentence embeddings, or their cosine similarities for 2+ texts",
                       formatter_class=HelpFormatter)
    p.add_argument("texts", nargs="+", help="one text (prints its vector) or several (prints their similarities)")
    p.add_argument("--model", default=None, help="sentence-transformers/BERT folder or built-in name "
                                                  "(default: minilm, all-MiniLM-L6-v2)")
    _quiet_arg(p)

    p = sub.add_parser("speak", help="text to speech into a 24 kHz WAV file", formatter_class=HelpFormatter)
    p.add_argument("text", help="the text to speak")
    p.add_argument("-o", "--output", default="speech.wav", help="WAV file to write")
    p.add_argument("--model", default=None, help="Orpheus model folder (default: small random weights)")
    p.add_argument("--voice", default=None, help="voice name, as the model knows it (default: the model's own)")
    _quiet_arg(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, embeddings, speech)",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]SOURCE",
                   help="repeatable: GGUF/HF/store text model, BERT folder (embeddings), Orpheus folder or "
                        "'random-orpheus' (speech), or a built-in name (smollm2, minilm); served as NAME, else the "
                        "built-in name or the file/folder name (default: smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    _server_runtime_args(p)
    p.add_argument("--no-warmup", action="store_true", help="compile programs on first use, not at start")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (warning: no start-up progress lines)")

    p = sub.add_parser("run-batch", help="answer an OpenAI Batch API file (JSONL) through the server's routes, "
                                         "in process (no HTTP)", formatter_class=HelpFormatter)
    p.add_argument("-i", "--input-file", required=True, help="JSONL: {custom_id, method, url, body} per line")
    p.add_argument("-o", "--output-file", required=True, help="JSONL: {id, custom_id, response, error} per line, "
                                                              "in input order")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]SOURCE", help="as for serve")
    _server_runtime_args(p)
    p.add_argument("--warmup", action="store_true", help="compile every program first (default: on first use)")
    _quiet_arg(p)

    p = sub.add_parser("convert", help="convert a GGUF/HF model into the local model store",
                       formatter_class=HelpFormatter)
    p.add_argument("source", nargs="?", default=None,
                   help="GGUF file, HF folder or built-in name (default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--name", default=None, help="store name (default: the source's file or folder name)")
    p.add_argument("--models-dir", default=None, help="store root (default: $MAXJAX_MODELS, else models/)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store of that name")

    sub.add_parser("bench", help="benchmarks/bench_generate.py (pass its flags after 'bench')", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] == "bench":
        return cmd_bench(None, argv[1:])
    args = parser.parse_args(argv)
    from maxjax.platforms import default_to_cpu_without_accelerator

    default_to_cpu_without_accelerator()  # no failed TPU probe on a CPU-only machine
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "embed": cmd_embed, "speak": cmd_speak,
                "serve": cmd_serve, "convert": cmd_convert, "run-batch": cmd_run_batch}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"maxjax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"maxjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
