"""Stop strings: a tiny random Llama with SmolLM2's real tokenizer, and the StopChecker on its own.

The random model samples varied tokens; a first run without a matching stop records the text and the
token boundaries the checker saw, then stop strings are cut from that text (so their positions are
known) and the same seeded run is repeated with them. Sampling depends only on (seed, position), so the
tokens are the same up to the stop.
"""

import jax
import pytest

from conftest import unavailable

from maxjax.architectures import llama
from maxjax.interfaces import GenerationStatus, SamplingParams, TextGenerationInputs, TextGenerationRequest
from maxjax.pipelines.stops import StopChecker
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
from maxjax.tokenizers import HFTokenizer

NEVER = "\x00never"
PROMPT = "Stop here please. The secret word is banana"


@pytest.fixture(scope="module")
def setup(smollm2_gguf):
    tokenizer = HFTokenizer.from_gguf(smollm2_gguf, max_length=128)
    cfg = llama.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8)
    engine = Engine(llama, cfg, llama.init_params(cfg, jax.random.key(0)),
                    RuntimeConfig(max_batch_size=2, max_seq_len=128, length_buckets=(128,), batch_buckets=(2,),
                                  max_num_steps=8))
    pipeline = TextGenerationPipeline(engine, tokenizer)
    reference = _generate(pipeline, tokenizer, [NEVER], num_steps=1)
    return pipeline, tokenizer, reference


def _generate(pipeline, tokenizer, stop, num_steps=8, max_new_tokens=24, stream=False):
    """Runs one seeded request; returns (context, tokens, final text, per-call boundaries / streamed pieces)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, top_k=0, temperature=1.0, seed=5)
    ctx = tokenizer.build_context(TextGenerationRequest(request_id="r", index=0, model_name="tiny", prompt=PROMPT,
                                                        stop=stop, sampling_params=params))
    tokens, trace = [], []
    while not ctx.is_done:
        tokens += pipeline.next_token(TextGenerationInputs({"r": ctx}, num_steps=num_steps))["r"].tokens
        checker = pipeline.stop_checker("r")
        trace.append(checker.take_new_text() if stream else len(checker.text))
    checker = pipeline.stop_checker("r")
    pipeline.release("r")
    return ctx, tokens, checker, trace


def _boundary(text, bounds, before, after):
    """A token boundary with at least ``before`` characters of the token before it and ``after`` of the one
    after, such that text[b - before: b + after] first occurs there."""
    starts = [0] + bounds[:-1]
    for i in range(len(bounds) - 1):
        b = bounds[i]
        if b - starts[i] >= before and bounds[i + 1] - b >= after:
            stop = text[b - before: b + after]
            if text.find(stop) == b - before and "\ufffd" not in stop:
                return i, b
    unavailable("the random model produced no suitable token boundary")


def test_reference_run_has_no_stop(setup):
    _, _, (ctx, tokens, checker, _) = setup
    assert ctx.status is GenerationStatus.MAXIMUM_LENGTH and len(tokens) == 24
    assert not checker.stopped and checker.visible_text == checker.text


def test_stop_string_spanning_two_tokens(setup):
    pipeline, tokenizer, (_, ref_tokens, ref_checker, bounds) = setup
    text = ref_checker.text
    i, b = _boundary(text, bounds, 2, 2)
    stop = text[b - 2: b + 2]
    ctx, tokens, checker, _ = _generate(pipeline, tokenizer, [stop], num_steps=8)
    assert ctx.status is GenerationStatus.END_OF_SEQUENCE
    assert tokens == ref_tokens[: i + 2]  # the token completing the stop is the last one; later ones are dropped
    assert checker.stop_text_offset == b - 2
    assert checker.visible_text == text[: b - 2]


def test_stop_string_in_the_prompt_only_does_not_stop(setup):
    pipeline, tokenizer, (_, ref_tokens, ref_checker, _) = setup
    stops = ["banana", "Stop here", tokenizer.decode_tokens(tokenizer.encode_text(PROMPT)[-1:])]
    assert not any(s in ref_checker.text for s in stops)
    ctx, tokens, checker, _ = _generate(pipeline, tokenizer, stops)
    assert ctx.status is GenerationStatus.MAXIMUM_LENGTH
    assert tokens == ref_tokens and checker.visible_text == ref_checker.text


def test_overlapping_stop_strings_earliest_start_wins(setup):
    pipeline, tokenizer, (_, ref_tokens, ref_checker, bounds) = setup
    text = ref_checker.text
    i, b = _boundary(text, bounds, 3, 2)
    long, short = text[b - 3: b + 2], text[b - 1: b + 2]  # both complete on the same token
    for stops in ([short, long], [long, short]):
        ctx, tokens, checker, _ = _generate(pipeline, tokenizer, stops)
        assert ctx.status is GenerationStatus.END_OF_SEQUENCE and tokens == ref_tokens[: i + 2]
        assert checker.visible_text == text[: b - 3]
    # One stop string overlapping another that would complete later: the first to complete ends generation.
    later = text[b - 1: b + 2] + text[b + 2: b + 6]
    ctx, tokens, checker, _ = _generate(pipeline, tokenizer, [later, text[b - 3: b + 1]])
    assert tokens == ref_tokens[: i + 2] and checker.visible_text == text[: b - 3]


def test_streaming_never_emits_a_possible_stop_prefix(setup):
    pipeline, tokenizer, (_, _, ref_checker, bounds) = setup
    text = ref_checker.text
    _, b = _boundary(text, bounds, 2, 2)
    ctx, _, checker, pieces = _generate(pipeline, tokenizer, [text[b - 2: b + 2]], num_steps=1, stream=True)
    streamed = ""
    for piece in pieces:
        streamed += piece
        assert checker.visible_text.startswith(streamed)
    assert streamed == checker.visible_text == text[: b - 2]


class _Pieces:
    """A decoder returning given text pieces, one per push."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def push(self, ids):
        return self.pieces.pop(0)

    def flush(self):
        return ""


def test_stop_checker_holds_back_stop_prefixes():
    checker = StopChecker(["</end>", "STOP"], _Pieces(["Hello </", "en", "d> more"]))
    assert not checker.push(1) and checker.safe_text() == "Hello "
    assert checker.take_new_text() == "Hello "
    assert not checker.push(2) and checker.safe_text() == "Hello " and checker.take_new_text() == ""
    assert checker.push(3) and checker.visible_text == "Hello " and checker.stop_text_offset == 6
    assert checker.take_new_text() == ""
    assert checker.push(4)  # pushes after the stop change nothing
    assert checker.text == "Hello </end> more"


def test_stop_checker_releases_a_false_prefix():
    checker = StopChecker(["STOP"], _Pieces(["go ST", "ay", "ST"]))
    checker.push(1)
    assert checker.safe_text() == "go "
    checker.push(2)
    assert checker.safe_text() == "go STay"
    checker.push(3)
    assert checker.safe_text() == "go STay"
    checker.finish()  # the request ended another way: held text is released
    assert checker.safe_text() == checker.visible_text == "go STayST"
    with pytest.raises(ValueError):
        StopChecker(["", ""], _Pieces([]))
