"""The `maxjax` command's generate flags, chat, bench and the model store, each against the Python API.

`generate` runs in-process (`maxjax.cli.main`, stdout captured) on tiny random models that carry SmolLM2's
tokenizer (tests/tiny_models.py); its text must equal `LLM`'s greedy text for the same request and runtime
config, so a flag the CLI dropped or mis-mapped shows as a different text. `--tensor-parallel 2` runs in a
subprocess with two forced host devices. `chat` runs on the real SmolLM2 and `bench` on its quick random shape
(both slow).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
from maxjax.cli import main
from maxjax.interfaces import SamplingParams
from conftest import require

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"
SEQ = ["--max-seq-len", "128", "--max-new-tokens", "12"]
RUNTIME = dict(max_batch_size=1, max_seq_len=128, progress=False)  # what the CLI's generate builds from SEQ
PARAMS = SamplingParams(max_new_tokens=12)


@pytest.fixture(autouse=True)
def maxjax_log_handlers():
    """The command adds a stderr handler to the "maxjax" logger (bound to this test's captured stderr): removed
    after each test, so later tests do not log into a closed stream."""
    log = logging.getLogger("maxjax")
    handlers, level = list(log.handlers), log.level
    yield
    log.handlers[:] = handlers
    log.setLevel(level)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_gguf) -> Path:
    return tiny_models.hf_folder(tmp_path_factory.mktemp("tiny") / "tiny", smollm2_gguf)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_gguf) -> Path:
    """Q8_0 blocks, another random model on the same vocabulary: the draft model and the --quantize gguf source."""
    return tiny_models.q8_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", smollm2_gguf, seed=3)


@pytest.fixture(scope="module")
def llm(tiny):
    from maxjax.pipelines.llm import LLM

    return LLM(str(tiny), **RUNTIME)


def cli(capsys, *args: str) -> str:
    """`maxjax ARGS` in this process; its stdout (exit status 0 asserted)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def raw(llm, prompt, params, **fields):
    llm.chat = False
    try:
        return llm.complete([prompt], params, **fields)[0]
    finally:
        llm.chat = True


def test_generate_plain_stop_and_raw_equal_llm(capsys, tiny, llm):
    full = llm.generate(PROMPT, PARAMS)
    assert cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ) == full + "\n"
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a stop string from the middle of the greedy text
    cut = llm.generate(PROMPT, PARAMS, stop=[stop])
    assert stop not in cut and len(cut) < len(full)
    assert cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ, "--stop", stop) == cut + "\n"
    expected = raw(llm, PROMPT, PARAMS).text
    assert expected != full  # the chat template makes a difference here
    assert cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ, "--raw") == expected + "\n"


def test_generate_logprobs_prints_llm_values(capsys, tiny, llm):
    ref = llm.complete([PROMPT], PARAMS, logprobs=3)[0]
    lines = cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ, "--logprobs", "3").splitlines()
    assert lines[0] == ref.text
    rows = [re.fullmatch(r"  \[(\d+)\] (-?\d+\.\d{4})  top: (.*)", line) for line in lines[1:]]
    assert all(rows) and len(rows) == len(ref.tokens) == len(ref.log_probabilities)
    for step, (row, lp) in enumerate(zip(rows, ref.log_probabilities)):
        assert int(row[1]) == step
        assert float(row[2]) == pytest.approx(lp.token_log_probabilities[0], abs=1e-4)
        top = lp.top_log_probabilities[0]
        assert row[3].count(": ") == len(top) == 3
        assert [float(v) for v in re.findall(r": (-?\d+\.\d{3})", row[3])] == pytest.approx(list(top.values()), abs=1e-3)


def test_generate_json_schema_equals_llm_and_validates(capsys, tmp_path, tiny, llm):
    jsonschema = require("jsonschema")
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]},
                                               "rank": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    params = SamplingParams(max_new_tokens=40)
    expected = llm.generate(PROMPT, params, response_format=response_format)
    jsonschema.validate(json.loads(expected), schema)
    out = cli(capsys, "generate", PROMPT, "--model", str(tiny), "--max-seq-len", "128", "--max-new-tokens", "40",
              "--json-schema", str(tmp_path / "schema.json"))
    assert out == expected + "\n"


def test_generate_lora_equals_llm_with_the_adapter(capsys, tmp_path, tiny, llm, add_random_lora):
    import transformers

    from maxjax.pipelines.llm import LLM

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    add_random_lora(base, tmp_path, "sql", ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, seed=1, std=1.0)
    with_lora = LLM(str(tiny), lora_adapters={"sql": str(tmp_path / "sql")}, **RUNTIME)
    expected = with_lora.generate(PROMPT, PARAMS, lora_name="sql")
    assert expected != llm.generate(PROMPT, PARAMS)  # the adapter changes the text
    out = cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ, "--lora", f"sql={tmp_path / 'sql'}")
    assert out == expected + "\n"
    out = cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ, "--lora", f"sql={tmp_path / 'sql'}",
              "--lora-name", "sql")
    assert out == expected + "\n"


def test_generate_speculative_ngram_and_draft_give_the_plain_text(capsys, tiny, tiny_gguf, llm):
    prompt = "Repeat after me: one two three four, one two three four, one two three four"
    params = SamplingParams(max_new_tokens=20)
    expected = llm.generate(prompt, params)
    seq = ["--max-seq-len", "128", "--max-new-tokens", "20"]
    out = cli(capsys, "generate", prompt, "--model", str(tiny), *seq, "--speculative", "ngram",
              "--num-speculative-tokens", "3")
    assert out == expected + "\n"
    out = cli(capsys, "generate", prompt, "--model", str(tiny), *seq, "--speculative", "draft",
              "--draft-model", str(tiny_gguf), "--num-speculative-tokens", "3")
    assert out == expected + "\n"


def test_generate_quantize_int8_and_gguf_equal_llm(capsys, tiny, tiny_gguf, llm):
    import jax
    import jax.numpy as jnp

    from maxjax.pipelines.llm import LLM

    int8 = LLM(str(tiny), quantize="int8", **RUNTIME).generate(PROMPT, PARAMS)
    assert int8 != llm.generate(PROMPT, PARAMS)  # int8 weights change this random model's greedy text
    assert cli(capsys, "generate", PROMPT, "--model", str(tiny), *SEQ, "--quantize", "int8") == int8 + "\n"
    kept = LLM(str(tiny_gguf), quantize="gguf", **RUNTIME)
    assert any(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(kept.pipeline.engine.params))  # Q8_0 blocks kept
    expected = kept.generate(PROMPT, PARAMS)
    assert cli(capsys, "generate", PROMPT, "--model", str(tiny_gguf), *SEQ, "--quantize", "gguf") == expected + "\n"


TP_SCRIPT = """
import contextlib, io, json, sys
import jax
from maxjax.cli import main
from maxjax.pipelines.llm import LLM
model, prompt = sys.argv[1:3]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["generate", prompt, "--model", model, "--max-seq-len", "128", "--max-new-tokens", "12",
                 "--tensor-parallel", "2"])
llm = LLM(model, max_batch_size=1, max_seq_len=128, tensor_parallel=2, progress=False)
mesh = llm.pipeline.engine.mesh
print(json.dumps({"code": code, "cli": out.getvalue(), "llm": llm.generate(prompt, max_new_tokens=12),
                  "devices": len(jax.devices()), "mesh": dict(mesh.shape) if mesh is not None else None}))
"""


def test_generate_tensor_parallel_2_on_forced_host_devices(tiny, llm):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(tiny), PROMPT], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and got["devices"] == 2 and got["mesh"] == {"data": 1, "model": 2}
    assert got["cli"] == got["llm"] + "\n"
    assert got["llm"] == llm.generate(PROMPT, PARAMS)  # split heads and MLP: the one-device tokens


def test_convert_then_load_by_store_name_and_through_maxjax_models(capsys, tmp_path, monkeypatch, tiny, llm):
    from maxjax.models import load_model
    from maxjax.weights import resolve_source

    store = tmp_path / "store"
    monkeypatch.setenv("MAXJAX_MODELS", str(store))
    cli(capsys, "convert", str(tiny), "--name", "tiny-store")  # no --models-dir: MAXJAX_MODELS is the store
    assert (store / "tiny-store" / "config.json").is_file()
    source = resolve_source("tiny-store")
    assert source.kind == "store" and source.path == store / "tiny-store"
    ids = [llm.tokenizer.encode_text(PROMPT).tolist()]
    direct = load_model(tiny, tokenizer=False)
    by_name = load_model("tiny-store")
    assert by_name.tokenizer.encode_text(PROMPT).tolist() == ids[0]
    assert (by_name.logits(ids) == direct.logits(ids)).all()
    expected = llm.generate(PROMPT, PARAMS)
    assert cli(capsys, "generate", PROMPT, "--model", "tiny-store", *SEQ) == expected + "\n"
    monkeypatch.setenv("MAXJAX_MODELS", str(tmp_path / "elsewhere"))  # the name resolves in the store only
    capsys.readouterr()
    assert main(["generate", PROMPT, "--model", "tiny-store", *SEQ]) == 2
    assert "no store named 'tiny-store'" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_two_turns_equal_llm_on_smollm2(capsys, monkeypatch, smollm2_gguf):
    from maxjax.pipelines import llm as llm_module

    built = []

    class Recorded(llm_module.LLM):  # the LLM the command builds, kept as the reference (one load, not two)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(llm_module, "LLM", Recorded)
    turns = ["What is the capital of France?", "And of Italy?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))  # then EOF
    out = cli(capsys, "chat", "--model", str(smollm2_gguf), "--max-seq-len", "256", "--max-new-tokens", "24")
    (reference,) = built
    params = SamplingParams(max_new_tokens=24)
    first = reference.generate([{"role": "user", "content": turns[0]}], params)
    second = reference.generate([{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": turns[1]}], params)
    assert first == "The capital of France is Paris."
    assert second and second != first
    assert second != reference.generate([{"role": "user", "content": turns[1]}], params)  # the history matters
    assert out == f"you> model> {first}\nyou> model> {second}\nyou> "


@pytest.mark.slow  # HF transformers is the peer
def test_bench_prints_ratio_lines(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `bench` replaces sys.argv for the script
    out = cli(capsys, "bench", "--random-shape", "smollm2", "--quick", "--no-start", "--cache-dir",
              str(tmp_path / "cache"), "--json", str(tmp_path / "bench.json"))
    result = json.loads((tmp_path / "bench.json").read_text())
    (row,) = result["decode"]
    header = next(line for line in out.splitlines() if line.strip().startswith("batch |"))
    assert "ratio" in header
    line = next(line for line in out.splitlines() if re.match(r"\s+1 \|", line))
    assert f"{row['ratio']:.2f}x" in line and row["ratio"] > 0
    assert f"({result['ttft']['ratio']:.2f}x)" in next(line for line in out.splitlines()
                                                        if line.startswith("time to first token"))
