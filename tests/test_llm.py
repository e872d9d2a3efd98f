"""The notebook wrapper and the CLI on the real SmolLM2: text, streaming, queueing, stops, logprobs, tools."""

import subprocess
import sys

import pytest

from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    from maxjax.pipelines.llm import LLM

    return LLM(str(smollm2_gguf), max_batch_size=2, max_seq_len=256, length_buckets=(128, 256), max_num_steps=8)


def test_chat_answer_and_raw_completion(llm):
    assert llm.generate("What is the capital of France?") == "The capital of France is Paris."
    llm.chat = False
    try:
        text = llm.generate("The three primary colors are", SamplingParams(max_new_tokens=16))
    finally:
        llm.chat = True
    assert text.startswith(" the primary colors of the RGB color model: red, blue, and green")


def test_temperature_without_top_k_samples(llm):
    greedy = {llm.generate("Tell me a story.", max_new_tokens=8, seed=seed) for seed in range(4)}
    sampled = {llm.generate("Tell me a story.", max_new_tokens=8, temperature=1.2, seed=seed) for seed in range(4)}
    assert len(greedy) == 1 and len(sampled) > 1  # top_k=0 applied: the seed matters
    assert llm.generate("Tell me a story.", max_new_tokens=8, temperature=1.2, top_k=1) in greedy


def test_more_prompts_than_slots_queue_and_keep_order(llm):
    params = SamplingParams(max_new_tokens=12)
    prompts = ["What is the capital of France?", "Name a fruit.", "What is 2 + 2?"]
    batched = llm.generate(prompts, params)  # 3 prompts, 2 slots: one waits for a free slot
    alone = [llm.generate(p, params) for p in prompts]
    assert batched == alone
    assert llm.pipeline.slots.num_free == 2


def test_a_failed_call_reports_its_own_error_and_frees_every_slot(llm, monkeypatch):
    before = llm.generate("What is 2 + 2?", max_new_tokens=4)

    def broken_decode(*args, **kwargs):
        raise RuntimeError("device fault")

    monkeypatch.setattr(llm.pipeline, "_decode", broken_decode)
    with pytest.raises(RuntimeError, match="device fault"):  # not a second error from releasing twice
        llm.generate(["Name a fruit.", "What is 2 + 2?", "Hi"], max_new_tokens=4)
    with pytest.raises(RuntimeError, match="device fault"):
        list(llm.stream("Name a fruit.", max_new_tokens=4))
    monkeypatch.undo()
    assert llm.pipeline.slots.num_free == 2 and llm.pipeline.engine.pool.num_used == 0
    assert llm.generate("What is 2 + 2?", max_new_tokens=4) == before  # served as before the failures


def test_stream_equals_generate_and_stop_strings_are_cut(llm):
    params = SamplingParams(max_new_tokens=20)
    full = llm.generate("Tell me about the ocean.", params)
    pieces = list(llm.stream("Tell me about the ocean.", params))
    assert len(pieces) > 1 and "".join(pieces) == full
    words = full.split()
    stop = " " + words[3]  # a stop string in the middle of the answer
    cut = llm.complete(["Tell me about the ocean."], SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    assert cut.final_status == GenerationStatus.END_OF_SEQUENCE
    assert cut.text == full[: full.index(stop)]
    assert "".join(llm.stream("Tell me about the ocean.", SamplingParams(max_new_tokens=20), stop=stop)) == cut.text


def test_logprobs_and_echo_shapes(llm):
    c = llm.complete(["Hi"], SamplingParams(max_new_tokens=5, ignore_eos=True), logprobs=3, echo=True)[0]
    prompt = llm.tokenizer.build_context(TextGenerationRequest("p", 0, "smollm2", messages=[
        {"role": "user", "content": "Hi"}])).prompt_tokens
    assert len(c.tokens) == len(c.log_probabilities) == 5
    assert all(len(lp.top_log_probabilities[0]) == 3 for lp in c.log_probabilities)
    assert len(c.prompt_log_probabilities) == len(prompt) - 1  # every prompt token but the first
    assert all(lp.token_log_probabilities[0] <= 0 for lp in c.log_probabilities + c.prompt_log_probabilities)


def test_tools_on_a_model_without_tool_format_warn(llm):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                             "parameters": {"type": "object", "properties": {}}}}
    with pytest.warns(UserWarning, match="no tool-call format"):
        c = llm.complete(["Weather in Paris?"], SamplingParams(max_new_tokens=4), tools=[tool])[0]
    assert c.tool_calls == []


def test_cli_generate_streams_the_answer():
    result = subprocess.run([sys.executable, "-m", "maxjax.cli", "generate", "What is the capital of France?",
                             "--max-new-tokens", "16", "--max-seq-len", "256"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "tokens in" in result.stderr


def test_cli_reports_bad_input_clearly():
    result = subprocess.run([sys.executable, "-m", "maxjax.cli", "generate", "hi", "--top-p", "1.5"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "top_p" in result.stderr


def test_short_of_kv_pages_llm_preempts_and_gives_the_same_texts(llm, smollm2_gguf):
    from maxjax.pipelines.llm import LLM

    prompts = ["Tell me a story about a dragon.", "Explain how a bicycle works.", "Describe the ocean.",
               "Write a poem about autumn."]
    params = SamplingParams(max_new_tokens=40, top_k=1, ignore_eos=True)
    expected = [llm.generate(p, params) for p in prompts]
    small = LLM(str(smollm2_gguf), max_batch_size=4, max_seq_len=256, length_buckets=(128, 256), max_num_steps=8,
                page_size=16, num_pages=14, progress=False)  # each needs ~5 pages of 16: 4 need ~20
    assert small.generate(prompts, params) == expected
    assert small.pipeline.pages.preemptions > 0 and small.pipeline.engine.pool.num_used == 0


def test_the_next_chat_turn_reuses_the_cached_conversation(llm):
    pool = llm.pipeline.engine.pool
    chat = [{"role": "user", "content": "Name a fruit."}]
    answer = llm.generate(chat, max_new_tokens=12, top_k=1)
    chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a vegetable?"}]
    before_hits, before_queried = pool.hit_tokens, pool.queried_tokens
    llm.generate(chat, max_new_tokens=4, top_k=1)
    prompt = pool.queried_tokens - before_queried
    assert pool.hit_tokens - before_hits >= prompt - 16  # only the new message (and the template around it)
