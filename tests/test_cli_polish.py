"""The first hour's rough edges, without a model: help text and defaults, refusals before a model loads, the
runtime flags shared by generate and serve, built-in names, keyword checks, progress lines, the platform list."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maxjax import cli
from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_and_the_top_help_has_no_markup():
    parser = cli.build_parser()
    assert "``" not in parser.format_help() and "``" not in (parser.description or "")
    for name, sub in _subparsers(parser).items():
        if name == "bench":  # its flags are bench_generate.py's
            continue
        for action in sub._actions:
            assert action.help, f"maxjax {name} {action.option_strings or action.dest}: no help text"
    text = _subparsers(parser)["generate"].format_help()
    assert "(default: 256)" in text and "(default: float32)" in text  # --max-new-tokens, --dtype


RUNTIME_FLAGS = ["--dtype", "--matmul-precision", "--quantize", "--tensor-parallel", "--data-parallel", "--lora",
                 "--speculative", "--num-speculative-tokens", "--draft-model", "--max-seq-len", "--page-size",
                 "--num-pages", "--kv-cache-memory", "--kv-cache-dtype", "--no-prefix-caching"]


def test_serve_takes_the_runtime_flags_of_generate():
    subs = _subparsers(cli.build_parser())

    def flags(name):
        return {a.option_strings[-1]: (a.default, a.choices, a.type) for a in subs[name]._actions
                if a.option_strings and a.option_strings[-1] in RUNTIME_FLAGS}

    assert set(flags("serve")) == set(RUNTIME_FLAGS) and flags("serve") == flags("generate")
    args = cli.build_parser().parse_args(["serve", "--quantize", "gguf", "--speculative", "ngram", "--dtype", "auto",
                                          "--num-speculative-tokens", "3", "--matmul-precision", "high"])
    runtime = cli._runtime(args)
    assert (runtime["quantize"], runtime["speculative"], runtime["num_speculative_tokens"], runtime["dtype"],
            runtime["matmul_precision"]) == ("gguf", "ngram", 3, "auto", "high")


@pytest.mark.parametrize("argv, match", [
    (["serve", "--speculative", "draft"], "draft_model"),
    (["serve", "--draft-model", "smollm2"], "draft_model"),
    (["serve", "--num-speculative-tokens", "99"], "num_speculative_tokens"),
    (["serve", "--lora", "no-equals-sign"], "NAME=PATH"),
    (["serve", "--length-buckets", "128,lots"], "--length-buckets"),
    (["serve", "--model", "a=smollm2", "--model", "a=minilm"], "given twice"),
    (["serve", "--model", "no-such-model.gguf"], "no-such-model.gguf"),
])
def test_serve_refuses_bad_flags_before_anything_loads(argv, match, monkeypatch, capsys):
    require("uvicorn")
    import maxjax.server.app as app
    import maxjax.server.main as main

    monkeypatch.setattr(app, "create_app", lambda *a, **k: pytest.fail("the app was built"))
    monkeypatch.setattr(main, "create_app", lambda *a, **k: pytest.fail("the app was built"))
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_whitespace_prompt_and_bad_schema_fail_before_the_model_loads(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_load_llm", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["generate", " \n\t "]) == 2
    assert "prompt is empty (or only whitespace)" in capsys.readouterr().err
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "no-such-type"}}}))  # valid JSON
    assert cli.main(["generate", "hi", "--json-schema", str(schema)]) == 2
    err = capsys.readouterr().err
    assert str(schema) in err and "json_schema is invalid" in err


def test_speak_prints_the_path_and_its_summary_on_stdout(monkeypatch, capsys, tmp_path):
    from maxjax.pipelines import audio

    calls = []

    def fake(text, path, model=None, voice=None, progress=True):
        calls.append(progress)
        return {"path": str(path), "sample_rate": 24000, "samples": 4800, "duration_s": 0.2}

    monkeypatch.setattr(audio, "speak_to_file", fake)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["speak", "Hello", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["path"] == "speech.wav" and str(tmp_path / "speech.wav") in err
    assert calls == [False]  # --quiet
    assert cli.main(["speak", "   "]) == 2


def test_built_in_names_and_their_precedence(tmp_path, smollm2_gguf):
    from maxjax.weights.sources import resolve_source

    assert resolve_source("smollm2").path == smollm2_gguf
    with pytest.raises(ValueError, match="embeddings"):
        resolve_source("minilm")  # the built-in embeddings model is no text model
    store = tmp_path / "smollm2"  # a store converted under a built-in's name replaces it
    store.mkdir()
    (store / "config.json").write_text(json.dumps({"format": "maxjax-store"}))
    assert resolve_source("smollm2", models_root=tmp_path).kind == "store"
    with pytest.raises(FileNotFoundError, match="built-in"):
        resolve_source("no-such-model", models_root=tmp_path)


def test_unknown_keywords_are_value_errors_naming_them():
    from maxjax.pipelines.audio import TTS
    from maxjax.pipelines.llm import LLM
    from maxjax.pipelines.registry import load_pipeline

    llm = LLM.__new__(LLM)  # the checks come before anything touches a model
    for call in (lambda: llm.generate("Hi", tempreature=0.5), lambda: llm.complete(["Hi"], tempreature=0.5),
                 lambda: list(llm.stream("Hi", tempreature=0.5))):
        with pytest.raises(ValueError, match="tempreature"):
            call()
    with pytest.raises(ValueError, match="pitch"):
        next(TTS.__new__(TTS).stream("Hi", pitch=2))
    for task in ("text_generation", "embeddings_generation", "audio_generation"):
        with pytest.raises(ValueError, match="max_batch_sise"):
            load_pipeline("minilm" if task == "embeddings_generation" else None, task=task, max_batch_sise=4)


def test_load_pipeline_reports_its_phases_unless_silenced(caplog, minilm_dir):
    import logging

    from maxjax.pipelines.registry import load_pipeline

    with caplog.at_level(logging.INFO, logger="maxjax"):
        load_pipeline("minilm", task="embeddings_generation")
    assert "reading the embeddings model" in caplog.text and "embeddings model loaded in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maxjax"):
        load_pipeline(str(minilm_dir), task="embeddings_generation", progress=False)
    assert "reading" not in caplog.text


PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from maxjax.platforms import default_to_cpu_without_accelerator
print(default_to_cpu_without_accelerator())
import jax
print(jax.devices()[0].platform)
"""


def test_no_tpu_probe_on_a_machine_without_an_accelerator_plugin():
    from maxjax.platforms import accelerator_plugin_installed

    if accelerator_plugin_installed():
        pytest.skip("an accelerator plugin is installed: JAX keeps its own platform list")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "cpu"] and "libtpu" not in result.stderr
    chosen = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert chosen.stdout.split()[0] == "False"  # the user's choice stands


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    require("uvicorn")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    result = subprocess.run([sys.executable, "-m", "maxjax.cli", "serve", "--model", str(broken), "--port", "0",
                             "--no-warmup"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "a model failed to load" in result.stderr and "broken" in result.stderr
