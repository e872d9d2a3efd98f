"""Every Python and shell example in README.md and docs/*.md runs (tests/docs_examples.py says how they are
marked and run), so an example that stops working fails the suite.

One ``maxjax serve`` (the command of the block marked ``serve`` in docs/server.md) serves every server example;
one process runs every page in turn, so the compiled programs and native kernels load once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs_examples import MARKERS, ROOT, examples, pages, serve_command
from conftest import require
from serving import free_port, running_server

# Sizes for the server the test starts (added to the documented command): the buckets of tests/test_server.py,
# so the two share the compile cache, and programs compiled on first use instead of a warm-up of every one.
SERVE_RUNTIME = ["--no-warmup", "--max-batch-size", "4", "--max-seq-len", "256", "--length-buckets", "128,256",
                 "--max-num-steps", "8", "--drain-timeout", "5", "--log-level", "warning"]
PAGES = [str(p.relative_to(ROOT)) for p in pages()]



def _write_example_files(workdir: Path) -> None:
    """What the pages name: lm_eval_tasks/ (the suite's local lm-eval tasks), three small PEFT LoRA adapters for SmolLM2-135M (random A, zero B, as PEFT starts
    them) in adapters/, and draft.gguf (SmolLM2's own file standing in for a smaller draft model)."""
    torch = require("torch")
    peft = require("peft")
    transformers = require("transformers")
    from maxjax.weights import default_gguf

    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    for name in ("sql", "chat", "poems"):
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(base, lora)
        model.save_pretrained(str(workdir / "adapters" / name))
        base = model.unload()
    (workdir / "draft.gguf").symlink_to(default_gguf())
    shutil.copytree(ROOT / "tests" / "data" / "lm_eval", workdir / "lm_eval_tasks")


def test_every_example_runs_or_says_why_not():
    """Markers are known, skips give a reason, and exactly one block is the server the test starts."""
    found = [e for p in pages() for e in examples(p)]
    assert sum(e.runs for e in found) >= 20, "the pages lost their runnable examples"
    for example in found:
        where = f"{example.page}:{example.line}"
        assert example.marker in (None, *MARKERS), where
        if example.marker in ("skip", "pending"):
            assert example.reason, f"{where}: a skipped example says why"
    words = serve_command(8000)
    assert words[-2:] == ["--port", "8000"]
    assert any(e.needs_server and e.page == "README.md" for e in found), "README shows a server example"


def test_every_test_the_claims_page_names_exists():
    """docs/claims.md names the test behind each claim: a renamed or removed test must not leave a claim behind."""
    import ast
    import re

    text = (ROOT / "docs" / "claims.md").read_text()
    cited = re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", text)
    assert len(cited) > 50
    for file, name in cited:
        path = ROOT / "tests" / file
        assert path.is_file(), f"docs/claims.md cites {file}, which does not exist"
        if name:
            defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in defined, f"docs/claims.md cites {file}::{name}, which does not exist"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs-serve")
    port = free_port()
    with running_server([*serve_command(port), *SERVE_RUNTIME], tmp, port=port, cwd=tmp):
        yield port


@pytest.fixture(scope="module")
def results(server, tmp_path_factory):
    """Runs every page in one process; {page: [block results]}."""
    workdir = tmp_path_factory.mktemp("docs-examples")
    _write_example_files(workdir)
    out, log = workdir / "results.json", workdir / "examples.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MAXJAX_MODELS": str(workdir / "models")}
    with open(log, "w") as sink:
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_examples.py"), "--workdir", str(workdir),
                               "--port", str(server), "--out", str(out)], cwd=workdir, env=env, stdout=sink,
                              stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode or not out.exists():
        pytest.fail(f"the example runner exited with {done.returncode}:\n{log.read_text()[-6000:]}")
    by_page: dict[str, list[dict]] = {}
    for result in json.loads(out.read_text()):
        by_page.setdefault(result["page"], []).append(result)
        print(f"{result['page']}:{result['line']} {result['lang']} {result['status']} {result['seconds']} s")
    return by_page


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(results, page):
    ran = results.get(page, [])
    failed = [r for r in ran if r["status"] == "failed"]
    assert not failed, "\n\n".join(f"{r['page']}:{r['line']} ({r['lang']}):\n{r['code']}\n{r['error']}"
                                   for r in failed)
    assert all(r["status"] in ("passed", "skipped") for r in ran), [r["line"] for r in ran]
