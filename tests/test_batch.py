"""``maxjax run-batch``: every line answered in input order (bad lines too), bodies checked as over HTTP, texts
equal to ``LLM``'s greedy output on the same weights, embeddings equal to ``embed``'s."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import require

require("fastapi")

from maxjax.server import batch  # noqa: E402

RUNTIME = dict(max_batch_size=4, max_seq_len=128, length_buckets=(64, 128), max_num_steps=4)
CHATS = ["What is the capital of France?", "Name a color.", "Count to three.", "Say hi.", "Tell a joke.",
         "Why is the sky blue?"]
PROMPTS = ["The three primary colors are", "Once upon a time"]


def _line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _tiny_llama(folder, smollm2_gguf):
    """A small random Llama with SmolLM2's tokenizer and chat template; weights large enough that greedy choices
    are clear (no near ties between batch shapes)."""
    import torch
    import transformers

    from maxjax.tokenizers import HFTokenizer

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
                                      initializer_range=0.3)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    HFTokenizer.from_gguf(smollm2_gguf, max_length=256).save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_gguf):
    return _tiny_llama(tmp_path_factory.mktemp("batch") / "tiny", smollm2_gguf)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    from maxjax import LLM

    return LLM(str(tiny_dir), chat=False, progress=False, **RUNTIME)


def _batch_file() -> tuple[str, dict]:
    """The input lines and, per custom_id, what its output must say (None: a 200 answer)."""
    lines, expect = [], {}
    for i, text in enumerate(CHATS):
        lines.append(_line(f"chat-{i}", "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 12}))
        expect[f"chat-{i}"] = None
    lines.append("{not json")
    lines.append("")  # blank lines are not requests
    for i, text in enumerate(PROMPTS):
        lines.append(_line(f"cmpl-{i}", "/v1/completions", {"model": "tiny", "prompt": text, "temperature": 0,
                                                            "max_tokens": 10}))
        expect[f"cmpl-{i}"] = None
    lines.append(_line("emb-0", "/v1/embeddings", {"model": "minilm", "input": ["a cat", "a dog"]}))
    expect["emb-0"] = None
    lines.append(_line("bad-url", "/v1/images", {"model": "tiny"}))
    lines.append(_line("bad-method", "/v1/completions", {"model": "tiny", "prompt": "x"}, method="GET"))
    lines.append(_line("bad-body", "/v1/chat/completions", {"model": "tiny", "messages": [], "temperature": 0}))
    lines.append(_line("bad-temp", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 5}))
    lines.append(_line("bad-model", "/v1/completions", {"model": "nope", "prompt": "x"}))
    lines.append(_line("stream", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}))
    lines.append(_line("chat-0", "/v1/completions", {"model": "tiny", "prompt": "x"}))  # repeated custom_id
    lines.append(json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}))  # no custom_id
    expect.update({"bad-url": ("invalid_url", None), "bad-method": ("invalid_method", None),
                   "bad-body": (None, "messages"), "bad-temp": (None, "temperature"), "bad-model": (None, "model"),
                   "stream": ("invalid_request", None)})
    return "\n".join(lines) + "\n", expect


def test_parse_line_answers_what_cannot_be_sent():
    seen: dict[str, int] = {}
    assert batch.parse_line(_line("a", "/v1/completions", {"prompt": "x"}), 1, seen)[:2] == ("a", "/v1/completions")
    for text, code in [("[1]", "invalid_request"), ("{", "invalid_json"),
                       (_line("a", "/v1/completions", {}), "duplicate_custom_id"),
                       (_line("b", "/v2/x", {}), "invalid_url"),
                       (_line("c", "/v1/completions", [1]), "invalid_request"),
                       (json.dumps({"custom_id": 3, "url": "/v1/completions", "body": {}}), "invalid_request")]:
        out = batch.parse_line(text, 7, seen)
        assert out["response"] is None and out["error"]["code"] == code and out["error"]["line"] == 7, (text, out)


@pytest.mark.slow
def test_run_batch_answers_every_line_in_order_as_llm_does(tiny_dir, tiny_llm, minilm_dir, tmp_path):
    from maxjax.server.metrics import Metrics
    from maxjax.server.models import load_served_models

    text, expect = _batch_file()
    source = tmp_path / "in.jsonl"
    source.write_text(text)
    models = load_served_models([f"tiny={tiny_dir}", f"minilm={minilm_dir}"], RUNTIME, Metrics(), warmup=False)
    counts = batch.run_batch_with_models(models, source, tmp_path / "out.jsonl", progress=False, concurrency=8)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    def custom_id(line):
        try:
            return json.loads(line).get("custom_id")
        except json.JSONDecodeError:
            return None

    assert [o["custom_id"] for o in out] == [custom_id(line) for line in text.splitlines() if line.strip()]
    assert counts["lines"] == len(out) and counts["ok"] == 9 and counts["failed"] == len(out) - 9
    assert len({o["id"] for o in out}) == len(out)
    by_id = {}
    for o in out:
        if o["error"] is None:
            by_id.setdefault(o["custom_id"], o)
    for custom_id, wanted in expect.items():
        line = next(o for o in out if o["custom_id"] == custom_id)
        if wanted is None:
            assert line["error"] is None and line["response"]["status_code"] == 200, line
            continue
        code, param = wanted
        if code is not None:
            assert line["response"] is None and line["error"]["code"] == code, line
        else:
            status = 404 if param == "model" else 400  # an unknown model is OpenAI's 404 model_not_found
            assert line["response"]["status_code"] == status and line["response"]["body"]["error"]["param"] == param
            assert line["error"]["message"] == line["response"]["body"]["error"]["message"]
    repeated = [o for o in out if o["error"] and o["error"]["code"] == "duplicate_custom_id"]
    assert len(repeated) == 1 and out[0]["error"] is None
    assert out[-1]["custom_id"] is None and out[-1]["error"]["code"] == "invalid_request"

    llm = tiny_llm
    chats = llm.generate([[{"role": "user", "content": t}] for t in CHATS], temperature=0, max_new_tokens=12)
    completions = llm.generate(PROMPTS, temperature=0, max_new_tokens=10)
    got_chats = [by_id[f"chat-{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(6)]
    got_cmpl = [by_id[f"cmpl-{i}"]["response"]["body"]["choices"][0]["text"] for i in range(2)]
    assert got_chats == chats and got_cmpl == completions
    assert any(got_chats) and by_id["chat-0"]["response"]["body"]["usage"]["completion_tokens"] > 0

    from maxjax.pipelines.embeddings import embed

    vectors = [d["embedding"] for d in by_id["emb-0"]["response"]["body"]["data"]]
    np.testing.assert_allclose(vectors, embed(["a cat", "a dog"], model=str(minilm_dir)), atol=1e-5)


def test_run_lines_writes_in_input_order_while_answers_come_out_of_order():
    import asyncio

    async def app(scope, receive, send):  # answers line k after (5 - k) ticks: the last line first
        body = json.loads((await receive())["body"])
        await asyncio.sleep(0.01 * (5 - body["k"]))
        payload = json.dumps({"id": f"r{body['k']}", "usage": {"completion_tokens": 1}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})

    source = io.StringIO("".join(_line(f"c{k}", "/v1/completions", {"k": k}) + "\n" for k in range(5)))
    sink = io.StringIO()
    counts = asyncio.run(batch.run_lines(app, source, sink, 5, concurrency=5, progress=False))
    out = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert counts == {"lines": 5, "ok": 5, "failed": 0}
    assert [o["custom_id"] for o in out] == [f"c{k}" for k in range(5)]
    assert [o["response"]["request_id"] for o in out] == [f"r{k}" for k in range(5)]


@pytest.mark.slow
def test_llm_takes_token_ids_and_shows_progress_over_a_list(tiny_llm, capsys):
    ids = tiny_llm.tokenizer.encode_text(PROMPTS[0], add_special_tokens=True).tolist()
    greedy = dict(temperature=0, max_new_tokens=6)
    assert tiny_llm.generate([ids], **greedy) == tiny_llm.generate([PROMPTS[0]], **greedy)  # sent as is
    capsys.readouterr()
    tiny_llm.generate(PROMPTS, progress=True, **greedy)
    err = capsys.readouterr().err
    assert "generating" in err and "2/2" in err and "tok/s" in err
    tiny_llm.generate(PROMPTS, **greedy)  # LLM(progress=False)
    assert "generating" not in capsys.readouterr().err


def test_cli_names_a_missing_input_file(tmp_path, capsys):
    from maxjax import cli

    assert cli.main(["run-batch", "-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err


def test_an_idle_scheduler_with_fill_wait_takes_a_full_first_batch():
    import asyncio
    import threading
    import time

    from maxjax.server.metrics import Metrics
    from maxjax.server.scheduler import Job, Scheduler

    class Recording(Scheduler):
        def __init__(self):
            super().__init__("m", 4, Metrics())
            self.batches = []

        def step(self, batch):
            self.batches.append(len(batch))
            return list(batch)

        def free(self, job):
            pass

    scheduler = Recording()
    scheduler.fill_wait = 30.0  # ends as soon as the batch is full
    loop = asyncio.new_event_loop()
    scheduler.start()
    for i in range(4):  # arriving one by one, as the lines of a batch file do
        scheduler.submit(Job(f"r{i}", None, loop, asyncio.Queue()))
        time.sleep(0.05)
    threading.Thread(target=scheduler.stop, args=(5.0,)).start()
    deadline = time.monotonic() + 10
    while sum(scheduler.batches) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.close()
    assert scheduler.batches == [4]
