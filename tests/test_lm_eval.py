"""lm-evaluation-harness on a small local task set (tests/data/lm_eval: multiple choice, generate_until,
loglikelihood_rolling; no download): ``MaxjaxLM`` against lm-eval's own ``hf`` backend on the same SmolLM2 weights
(equal accuracy and generations, per-item log-likelihoods within 1e-3), and ``maxjax serve`` as lm-eval's
``local-completions`` / ``local-chat-completions`` backends against ``MaxjaxLM`` (one server start)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require
from serving import running_server

lm_eval = require("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"
TASKS = ["maxjax_mc", "maxjax_gen", "maxjax_docs"]
RUNTIME = dict(max_batch_size=4, max_seq_len=256, length_buckets=(128, 256), max_num_steps=8)  # as test_server


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR))


def _evaluate(model, task_manager, tasks=TASKS, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0, **kwargs)


def _per_item(result, task):
    """doc_id -> the item's filtered responses: [(loglikelihood, is_greedy)...], [text] or [loglikelihood]."""
    return {s["doc_id"]: s["filtered_resps"] for s in result["samples"][task]}


def _assert_same(got, want, metrics=("acc,none", "acc_norm,none", "exact_match,none")):
    for task in got["results"]:
        for metric in metrics:
            if metric in want["results"][task]:
                assert got["results"][task][metric] == want["results"][task][metric], (task, metric)
    for task in got["samples"]:
        a, b = _per_item(got, task), _per_item(want, task)
        assert a.keys() == b.keys()
        for doc_id in a:
            for x, y in zip(a[doc_id], b[doc_id], strict=True):
                if isinstance(x, str):
                    assert x == y, (task, doc_id)
                else:
                    x, y = (x, y) if isinstance(x, (int, float)) else (x[0], y[0])
                    assert abs(x - y) < 1e-3, (task, doc_id, x, y)


def test_gen_settings_read_as_lm_eval_backends_do():
    from maxjax.integrations.lm_eval import gen_settings

    greedy = {"top_k": 1}
    assert gen_settings({"until": "\n", "max_gen_toks": 5, "do_sample": False, "temperature": 0.7}, 256) == (
        ["\n"], 5, greedy)
    assert gen_settings({}, 256) == ([], 256, greedy)
    assert gen_settings({"until": ["a", "b"], "max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "other": 1},
                        256) == (["a", "b"], 9, {"temperature": 0.5, "top_p": 0.9})


def test_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    from maxjax.integrations.lm_eval import MaxjaxLM

    assert get_model("maxjax") is MaxjaxLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"  # lm-eval's lazy registry still fills


@pytest.fixture(scope="module")
def maxjax_lm(smollm2_gguf):
    from maxjax.integrations.lm_eval import MaxjaxLM

    return MaxjaxLM(str(smollm2_gguf), progress=False, **RUNTIME)


@pytest.fixture(scope="module")
def maxjax_result(maxjax_lm, task_manager):
    return _evaluate(maxjax_lm, task_manager)


@pytest.mark.slow
def test_maxjax_lm_matches_the_hf_backend(maxjax_result, hf_smollm2, smollm2_gguf, task_manager):
    import transformers
    from lm_eval.models.huggingface import HFLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    hf = _evaluate(HFLM(pretrained=hf_smollm2, tokenizer=tokenizer, batch_size=8), task_manager)
    _assert_same(maxjax_result, hf)
    mc = _per_item(maxjax_result, "maxjax_mc")
    assert len(mc) == 10 and all(len(choices) == 4 for choices in mc.values())
    assert 0.5 <= maxjax_result["results"]["maxjax_mc"]["acc,none"] <= 1.0  # the task is easy, not random
    assert any(text[0] for text in _per_item(maxjax_result, "maxjax_gen").values())
    assert maxjax_result["results"]["maxjax_docs"]["word_perplexity,none"] > 1



@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    tmp = tmp_path_factory.mktemp("lm_eval_serve")
    args = ["--no-warmup", "--model", f"smollm2={smollm2_gguf}", "--max-batch-size", str(RUNTIME["max_batch_size"]),
            "--max-seq-len", str(RUNTIME["max_seq_len"]), "--length-buckets", "128,256",
            "--max-num-steps", str(RUNTIME["max_num_steps"]), "--log-level", "warning"]
    with running_server(args, tmp) as server:
        yield server.base


@pytest.mark.slow
def test_serve_as_local_completions_matches_maxjax_lm(server, maxjax_result, task_manager):
    # tokenizer_backend "auto" finds the server's /tokenizer_info and /tokenize (no local tokenizer needed);
    # batch_size 4: four prompts (token ids) per request; loglikelihood by echo + logprobs with max_tokens=1.
    args = dict(model="smollm2", base_url=f"{server}/v1/completions", max_retries=1, timeout=600)
    result = _evaluate("local-completions", task_manager, model_args=args, batch_size=4)
    _assert_same(result, maxjax_result)


@pytest.mark.slow
def test_serve_as_local_chat_completions_matches_maxjax_lm(server, maxjax_lm, task_manager):
    args = dict(model="smollm2", base_url=f"{server}/v1/chat/completions", max_retries=1, timeout=600)
    chat = _evaluate("local-chat-completions", task_manager, tasks=["maxjax_gen"], model_args=args,
                     apply_chat_template=True)
    want = _evaluate(maxjax_lm, task_manager, tasks=["maxjax_gen"], apply_chat_template=True)
    _assert_same(chat, want)
    assert _per_item(chat, "maxjax_gen") != {}


@pytest.mark.slow
def test_serve_scoring_requests_as_lm_eval_sends_them(server):
    import httpx

    def post(path, body, status=200):
        response = httpx.post(f"{server}{path}", json=body, timeout=300)
        assert response.status_code == status, response.text
        return response.json()

    info = httpx.get(f"{server}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>" and info["chat_template"]
    ids = post("/tokenize", {"prompt": "The capital of France is", "add_special_tokens": False})["tokens"]
    assert post("/tokenize", {"prompt": "<|im_end|>", "add_special_tokens": False})["tokens"] == [2]
    assert post("/detokenize", {"tokens": ids})["prompt"] == "The capital of France is"
    assert post("/tokenize", {"prompt": "x", "model": "nope"}, 404)["error"]["code"] == "model_not_found"

    score = dict(model="smollm2", prompt=[ids, ids[:3]], echo=True, logprobs=1, temperature=0, seed=1234)
    zero = post("/v1/completions", dict(score, max_tokens=0))  # the prompt's log-probabilities only
    one = post("/v1/completions", dict(score, max_tokens=1))
    for z, o, prompt in zip(zero["choices"], one["choices"], [ids, ids[:3]]):
        assert len(z["logprobs"]["token_logprobs"]) == len(prompt) and z["logprobs"]["token_logprobs"][0] is None
        assert len(o["logprobs"]["token_logprobs"]) == len(prompt) + 1
        assert z["logprobs"]["token_logprobs"][1:] == pytest.approx(o["logprobs"]["token_logprobs"][1:-1], abs=1e-5)
    assert zero["choices"][0]["text"] == "The capital of France is" and zero["usage"]["completion_tokens"] == 0
    assert post("/v1/completions", dict(score, max_tokens=0, echo=False), 400)["error"]["param"] == "max_tokens"

    # A sequence ended by an eos / stop token id still lists that token (its text is not returned): a scoring
    # client reads one entry per prompt token plus one for the sampled token, as from OpenAI and vLLM.
    greedy = one["choices"][0]["logprobs"]
    token_id = post("/tokenize", {"prompt": greedy["tokens"][-1], "add_special_tokens": False})["tokens"][0]
    stopped = post("/v1/completions", dict(score, prompt=ids, max_tokens=1, stop_token_ids=[token_id]))["choices"][0]
    assert stopped["text"] == "The capital of France is" and stopped["finish_reason"] == "stop"
    assert stopped["logprobs"]["tokens"] == greedy["tokens"]
    assert stopped["logprobs"]["token_logprobs"][-1] == pytest.approx(greedy["token_logprobs"][-1], abs=1e-5)
