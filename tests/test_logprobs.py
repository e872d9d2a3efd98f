"""Log-probabilities and echo on real SmolLM2 vs HF transformers' log-softmax; no compiles after warm-up.

Both sides run the same dequantized GGUF weights in float32. Log-probabilities are the model's
log-softmax before penalties and temperature, so a sampled (tempered) row is compared the same way.
The prompt of the echo row is longer than the 32-token prefill chunk, so echo crosses a chunk boundary.
"""

import numpy as np
import pytest

from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationInputs, TextGenerationRequest
from maxjax.runtime.compile_cache import compile_count

pytestmark = pytest.mark.slow

# A log-probability is a logit minus the row's logsumexp, so its float32 error is at most twice the logits'
# (tests/test_llama_real.py: within 2e-4 of transformers; 1.4e-4 measured). A logprob taken after temperature
# or penalties, or from the wrong position, is off by orders of magnitude more.
TOLERANCE = 2 * 2e-4
LONG_PROMPT = ("In 1969, Apollo 11 landed on the Moon. The astronauts Neil Armstrong and Buzz Aldrin spent about "
               "two and a half hours outside the lunar module, collecting samples.")


@pytest.fixture(scope="module")
def pipe(smollm2_gguf):
    from maxjax.pipelines.registry import load_text_pipeline

    tokenizer, pipeline = load_text_pipeline(smollm2_gguf, max_batch_size=2, max_seq_len=256, length_buckets=(32, 256),
                                             batch_buckets=(2,), max_num_steps=4, max_logprobs=5)
    pipeline.warmup()
    return tokenizer, pipeline, compile_count()


@pytest.fixture(scope="module")
def hf_log_softmax(hf_smollm2):
    import torch

    model = hf_smollm2

    def log_softmax(ids):
        with torch.no_grad():
            logits = model(torch.tensor([list(map(int, ids))])).logits[0].double()
        return torch.log_softmax(logits, -1).numpy()  # [T, V]

    return log_softmax


def _context(tokenizer, rid, prompt, **kw):
    params = kw.pop("sampling_params", SamplingParams(max_new_tokens=10))
    return tokenizer.build_context(TextGenerationRequest(request_id=rid, index=0, model_name="smollm2", prompt=prompt,
                                                         sampling_params=params, **kw))


def _run(pipeline, contexts, num_steps=4):
    """Runs contexts to the end; per request (tokens, log_probabilities of every output concatenated, outputs)."""
    batch = {c.request_id: c for c in contexts}
    tokens = {rid: [] for rid in batch}
    lps = {rid: [] for rid in batch}
    firsts = {}
    while not all(c.is_done for c in batch.values()):
        for rid, out in pipeline.next_token(TextGenerationInputs(batch, num_steps=num_steps)).items():
            firsts.setdefault(rid, out)
            tokens[rid] += out.tokens
            lps[rid] += out.log_probabilities or []
    for rid in batch:
        pipeline.release(rid)
    return tokens, lps, firsts


def _check_entry(entry, token, ref_row, n):
    """One LogProbabilities entry vs a reference log-softmax row; returns the token's error."""
    assert len(entry.token_log_probabilities) == 1 and len(entry.top_log_probabilities) == 1
    err = abs(entry.token_log_probabilities[0] - ref_row[token])
    top = entry.top_log_probabilities[0]
    assert len(top) == n
    ref_top = np.argsort(-ref_row)[:n]
    ids = list(top)
    for i, (ours, ref) in enumerate(zip(ids, ref_top)):
        if ours != ref:  # only a near-tie may swap places
            assert abs(ref_row[ours] - ref_row[ref]) < TOLERANCE, (i, ours, ref)
    err = max(err, max(abs(top[i] - ref_row[i]) for i in ids))
    return err


def test_logprobs_and_echo_match_transformers(pipe, hf_log_softmax):
    tokenizer, pipeline, _ = pipe
    scored = _context(tokenizer, "scored", LONG_PROMPT, logprobs=5, echo=True)
    plain = _context(tokenizer, "plain", "The three primary colors are")
    prompt = scored.prompt_tokens.copy()
    assert prompt.size > 32  # echo crosses the prefill chunk boundary
    tokens, lps, firsts = _run(pipeline, [scored, plain])

    assert all(lp == [] for lp in [lps["plain"]]) and firsts["plain"].log_probabilities is None
    generated = tokens["scored"]
    assert len(generated) == 10
    # First output: len(prompt) - 1 echo entries, then one per generated token.
    assert len(lps["scored"]) == prompt.size - 1 + len(generated)
    ref = hf_log_softmax(np.concatenate([prompt, generated]))  # [P + G, V]
    echo_err = max(_check_entry(lps["scored"][j - 1], prompt[j], ref[j - 1], 5) for j in range(1, prompt.size))
    gen_err = max(_check_entry(lps["scored"][prompt.size - 1 + i], t, ref[prompt.size - 1 + i], 5)
                  for i, t in enumerate(generated))
    print(f"echo max error {echo_err:.2e}, generated max error {gen_err:.2e}")
    assert echo_err < TOLERANCE and gen_err < TOLERANCE
    # Greedy: every generated token is the reference argmax.
    assert all(int(np.argmax(ref[prompt.size - 1 + i])) == t for i, t in enumerate(generated))

    # The row without logprobs in the same batch decoded greedily too.
    plain_ids = np.concatenate([plain.prompt_tokens, tokens["plain"]])
    ref_plain = hf_log_softmax(plain_ids)
    p = plain.prompt_tokens.size
    assert all(int(np.argmax(ref_plain[p - 1 + i])) == t for i, t in enumerate(tokens["plain"]))


def test_sampled_row_reports_untempered_logprobs(pipe, hf_log_softmax):
    tokenizer, pipeline, _ = pipe
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=0, seed=7)
    ctx = _context(tokenizer, "hot", "Once upon a time", logprobs=2, sampling_params=params)
    prompt = ctx.prompt_tokens.copy()
    tokens, lps, _ = _run(pipeline, [ctx])
    assert len(lps["hot"]) == len(tokens["hot"]) == 8
    ref = hf_log_softmax(np.concatenate([prompt, tokens["hot"]]))
    err = max(_check_entry(lps["hot"][i], t, ref[prompt.size - 1 + i], 2) for i, t in enumerate(tokens["hot"]))
    assert err < TOLERANCE


def test_echo_without_logprobs_and_bad_logprobs(pipe):
    tokenizer, pipeline, _ = pipe
    ctx = _context(tokenizer, "echo0", "Hello there", echo=True)  # echo needs logprobs > 0: nothing returned
    _, lps, firsts = _run(pipeline, [ctx])
    assert lps["echo0"] == [] and firsts["echo0"].log_probabilities is None
    with pytest.raises(ValueError, match="max_logprobs"):
        pipeline.next_token(TextGenerationInputs({"x": _context(tokenizer, "x", "Hi", logprobs=6)}, num_steps=1))


def test_no_compiles_after_warmup_when_feature_rows_join(pipe):
    tokenizer, pipeline, after_warmup = pipe
    plain = _context(tokenizer, "p", "The capital of France is")
    scored = _context(tokenizer, "s", LONG_PROMPT, logprobs=3, echo=True)
    structured = _context(tokenizer, "j", "Write a JSON object:", response_format={"type": "json_object"},
                          sampling_params=SamplingParams(max_new_tokens=12))
    _run(pipeline, [plain, scored])
    _run(pipeline, [structured, _context(tokenizer, "p2", "Hello", logprobs=1)])
    assert structured.status in (GenerationStatus.END_OF_SEQUENCE, GenerationStatus.MAXIMUM_LENGTH)
    assert compile_count() == after_warmup
