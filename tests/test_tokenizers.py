"""Tokenizers: SentencePiece and HF/GGUF backends, chat templates, stream decoding, request validation."""

import asyncio
import json

import numpy as np
import pytest

from maxjax.context import TextContext
from maxjax.interfaces import PipelineTokenizer, SamplingParams, TextGenerationRequest
from maxjax.tokenizers import JSON_OBJECT_SCHEMA, HFTokenizer, SentencePieceTokenizer, load_tokenizer, render_chat

# The ChatML template embedded in SmolLM2-135M-Instruct's GGUF (tokenizer.chat_template).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS_TEMPLATE = (
    "{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}{% if enable_thinking is defined %}think={{ enable_thinking }}"
    "{% endif %}"
)
UNICODE_TEXTS = [
    "hello world",
    "naïve café – déjà vu",
    "日本語のテキストと中文字符",
    "emoji 🤖🎉 and family 👨‍👩‍👧 end",
    "  leading and  double  spaces\n\ttabs\n",
    "math: ∑ x² ≤ ∞",
]
CORPUS = "\n".join([
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into token ids and back again.",
    "Hello world, hello tokens, hello models.",
    "Numbers like 12345 and 3.14 appear in text too.",
    "Sentences about weather, cities, rivers and mountains.",
] * 40)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tok"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    return folder / "tok.model"


@pytest.fixture(scope="module")
def sp_tok(spm_model):
    return SentencePieceTokenizer(spm_model, max_length=256, chat_template=SMOLLM2_TEMPLATE)


@pytest.fixture(scope="module")
def gguf_tok(smollm2_gguf):
    return HFTokenizer.from_gguf(smollm2_gguf)


def request(**kwargs):
    return TextGenerationRequest("r", 0, "m", **kwargs)


def stream(tok, ids):
    decoder = tok.stream_decoder()
    pieces = [decoder.push(int(t)) for t in ids]
    return pieces + [decoder.flush()]


# ---- SentencePiece ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_sentencepiece_round_trip_and_reference(sp_tok, spm_model, text):
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(spm_model))
    ids = sp_tok.encode_text(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == reference.encode(text)
    assert sp_tok.decode_tokens(ids) == reference.decode(reference.encode(text))
    assert sp_tok.decode_tokens(ids) == text  # byte fallback and identity normalization: nothing lost


def test_sentencepiece_special_tokens(sp_tok):
    ids = sp_tok.encode_text("hello world", add_special_tokens=True)
    assert ids[0] == sp_tok.bos_token_id == 1 and sp_tok.eos == 2
    with_eos = [*ids.tolist(), sp_tok.eos]
    assert sp_tok.decode_tokens(with_eos, skip_special_tokens=True) == "hello world"
    assert sp_tok.decode_tokens(with_eos, skip_special_tokens=False) == "<s>hello world</s>"


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_sentencepiece_stream_equals_full_decode(sp_tok, text):
    ids = sp_tok.encode_text(text)
    pieces = stream(sp_tok, ids)
    assert "".join(pieces) == sp_tok.decode_tokens(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # multi-byte characters are never split


# ---- GGUF (SmolLM2) ----------------------------------------------------------------------------------

def test_gguf_metadata(gguf_tok):
    assert gguf_tok.eos == 2 and gguf_tok.bos_token_id == 1 and gguf_tok.eos_token_ids == (2,)
    assert gguf_tok.max_length == 8192 and gguf_tok.vocab_size == 49152 and not gguf_tok.add_bos_token
    assert gguf_tok.chat_template == SMOLLM2_TEMPLATE
    assert gguf_tok.encode_text("hi", add_special_tokens=True).tolist() == gguf_tok.encode_text("hi").tolist()
    assert gguf_tok.encode_text("<|im_start|>user\nhi<|im_end|>").tolist() == [1, 4093, 198, 6004, 2]
    assert gguf_tok.encode_text("x 12345").tolist()[-5:] == [33, 34, 35, 36, 37]  # digits one by one


@pytest.mark.parametrize("text", UNICODE_TEXTS + ["def f(x):\n    return x ** 2  # 🐍 ok"])
def test_gguf_stream_equals_full_decode(gguf_tok, text):
    ids = gguf_tok.encode_text(text)
    pieces = stream(gguf_tok, ids)
    assert "".join(pieces) == gguf_tok.decode_tokens(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_incomplete_bytes(gguf_tok):
    ids = gguf_tok.encode_text("🤖").tolist()
    assert len(ids) > 1
    decoder = gguf_tok.stream_decoder()
    assert [decoder.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🤖"
    partial = gguf_tok.stream_decoder()
    partial.push(ids[0])
    assert partial.flush() == "\ufffd"  # an unfinished character comes out replaced at the end


def test_gguf_save_and_restore(gguf_tok, tmp_path):
    gguf_tok.save(tmp_path)
    restored = HFTokenizer.from_dir(tmp_path)
    for text in UNICODE_TEXTS:
        assert restored.encode_text(text).tolist() == gguf_tok.encode_text(text).tolist()
    assert (restored.chat_template, restored.eos_token_ids, restored.bos_token_id, restored.max_length) == \
        (gguf_tok.chat_template, gguf_tok.eos_token_ids, gguf_tok.bos_token_id, gguf_tok.max_length)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_minilm_tokenizer_from_dir(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    ids = tok.encode_text("The quick brown fox jumps over the lazy dog.", add_special_tokens=True)
    assert ids.tolist() == [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]
    assert len(tok.encode_text("word " * 300)) == 300  # the file's truncation at 128 is not applied


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(gguf_tok, smollm2_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    texts = UNICODE_TEXTS + [
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "Call 555-0123 or pay $1,234.56 by 2024-12-31; 1e10 0x1F",
        "   \n\n\t  trailing   ",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "Ünïcödé ﬁ ligature, Ελληνικά, русский, עברית, العربية",
    ]
    for text in texts:
        ids = gguf_tok.encode_text(text)
        assert ids.tolist() == reference.encode(text), text
        assert gguf_tok.decode_tokens(ids) == reference.decode(ids.tolist())
        assert gguf_tok.decode_tokens(ids, skip_special_tokens=True) == \
            reference.decode(ids.tolist(), skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert gguf_tok.apply_chat_template(messages) == expected


# ---- chat templates ------------------------------------------------------------------------------------

def test_chatml_template_rendering(gguf_tok):
    text = gguf_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    parts = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "content": "there"}]}]
    assert gguf_tok.apply_chat_template(parts) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n"


def test_tools_template_and_options():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    text = render_chat(TOOLS_TEMPLATE, [{"role": "user", "content": "Weather in Zürich?"}], tools=tools,
                       options={"enable_thinking": False})
    assert text == f"<tools>{json.dumps(tools[0], ensure_ascii=False)}\n</tools>\n<|user|>Weather in Zürich?\n" \
                   "<|assistant|>think=False"


def test_context_from_chat_request_with_tools(sp_tok):
    tok = SentencePieceTokenizer(sp_tok.model_path, max_length=256, chat_template=TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    ctx = tok.build_context(request(messages=[{"role": "user", "content": "hello"}], tools=tools))
    expected = render_chat(TOOLS_TEMPLATE, [{"role": "user", "content": "hello"}], tools=tools)
    assert tok.decode_tokens(ctx.prompt_tokens) == tok.decode_tokens(tok.encode_text(expected))


def test_template_is_sandboxed():
    with pytest.raises(ValueError, match="chat template"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="only user turns"):
        render_chat("{{ raise_exception('only user turns') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="chat_template"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    assert render_chat("{{ strftime_now('%Y') | length }}", [{"role": "user", "content": "x"}]) == "4"


# ---- new_context ---------------------------------------------------------------------------------------

def test_new_context_from_prompt(gguf_tok):
    params = SamplingParams(max_new_tokens=20, stop=["\n\n"], min_new_tokens=2)
    req = request(prompt="The three primary colors are", logprobs=3, echo=True, stop=["END", "\n\n"],
                  sampling_params=params)
    ctx = asyncio.run(gguf_tok.new_context(req))
    assert isinstance(ctx, TextContext) and ctx.request_id == "r"
    assert ctx.prompt_tokens.tolist() == gguf_tok.encode_text("The three primary colors are").tolist()
    assert ctx.max_length == ctx.prompt_tokens.size + 20
    assert ctx.eos_token_ids == {2} and ctx.sampling_params is params and ctx.min_tokens == 2
    assert (ctx.log_probabilities, ctx.log_probabilities_echo, ctx.stop) == (3, True, ["END", "\n\n"])
    assert ctx.json_schema is None
    unlimited = gguf_tok.build_context(request(prompt=[5, 6, 7]))
    assert unlimited.max_length == 8192 and unlimited.prompt_tokens.tolist() == [5, 6, 7]


@pytest.mark.parametrize("response_format,schema", [
    ({"type": "json_schema", "json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
     {"type": "object", "properties": {"a": {"type": "integer"}}}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}, {"type": "array"}),
    ({"type": "json_object"}, JSON_OBJECT_SCHEMA),
    ({"type": "text"}, None),
])
def test_response_format_to_schema(sp_tok, response_format, schema):
    ctx = sp_tok.build_context(request(prompt="hello", response_format=response_format))
    assert ctx.json_schema == schema


def test_async_api_and_protocol(sp_tok, gguf_tok):
    for tok in (sp_tok, gguf_tok):
        assert isinstance(tok, PipelineTokenizer) and tok.expects_content_wrapping is False
        ids = asyncio.run(tok.encode("hello world"))
        assert asyncio.run(tok.decode(ids)) == "hello world"


BAD_REQUESTS = [
    (dict(), "neither prompt nor messages"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[1, -1]), "prompt token ids"),
    (dict(prompt=[1, 10**6]), "prompt token ids"),
    (dict(prompt=[1, 2.0]), "prompt token ids"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "not both"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"content": "no role"}]), "role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "images are not supported: this model is text-only"),
    (dict(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "unsupported content part"),
    (dict(messages=[{"role": "user", "content": 5}]), "content"),
    (dict(prompt="hi", images=[b"\x89PNG"]), "images are not supported"),
    (dict(prompt="hi", response_format={"type": "yaml"}), "response_format"),
    (dict(prompt="hi", response_format={"type": "json_schema"}), "json_schema"),
]


@pytest.mark.parametrize("kwargs,message", BAD_REQUESTS, ids=[m for _k, m in BAD_REQUESTS])
def test_bad_requests(gguf_tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gguf_tok.build_context(request(**kwargs))


def test_length_and_template_errors(spm_model, gguf_tok):
    tok = SentencePieceTokenizer(spm_model, max_length=8)
    with pytest.raises(ValueError, match="maximum length is 8"):
        tok.encode_text("the quick brown fox jumps over the lazy dog")
    with pytest.raises(ValueError, match="maximum length"):
        tok.build_context(request(prompt=list(range(8))))
    with pytest.raises(ValueError, match="chat template"):
        tok.build_context(request(messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(ValueError, match="prompt must be a str"):
        gguf_tok.encode_text(["not", "text"])
    with pytest.raises(ValueError, match="request must be"):
        gguf_tok.build_context({"prompt": "hi"})
