"""The embeddings pipeline through the EmbeddingsGenerator protocol: bucketing, batch invariance, truncation,
no compiles after warm-up, bad inputs; on a tiny random BERT (fast) and on all-MiniLM-L6-v2 against
sentence-transformers (slow)."""

from __future__ import annotations

import asyncio
import os
import threading

import jax
import numpy as np
import pytest
from jax import monitoring
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from maxjax.architectures.bert import BertConfig, encode, init_params
from maxjax.interfaces import EmbeddingsGenerator, EmbeddingsOutput, PipelineTokenizer, TextGenerationRequest
from maxjax.pipelines.embeddings import (
    EmbeddingsConfig,
    EmbeddingsPipeline,
    embed,
    embed_texts,
    load_embeddings_pipeline,
    plan_batches,
)
from maxjax.pipelines.embeddings_tokenizer import EmbeddingsTokenizer

# ---- compile counter (JAX's backend-compile event fires once per executable obtained) -----------------

_compiles = {"n": 0}
_lock = threading.Lock()


def _on_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        with _lock:
            _compiles["n"] += 1


monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    return _compiles["n"]


def test_compile_counter_counts():
    before = compile_count()
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    assert compile_count() > before


# ---- tiny model ---------------------------------------------------------------------------------------

WORDS = ("the a quick brown fox jumps over lazy dog cat sat on mat embeddings are vectors of text and words "
         "similar meaning close together far apart").split()
TINY = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pooling="mean", normalize=True, max_seq_length=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, pipeline) for a random tiny BERT with a WordPiece tokenizer.json that, like MiniLM's,
    carries its own truncation and padding (which must not apply)."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", ",", *WORDS])}
    assert len(vocab) <= TINY.vocab_size
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.enable_truncation(8)
    tk.enable_padding(length=12)
    path = tmp_path_factory.mktemp("tiny") / "tokenizer.json"
    tk.save(str(path))
    params = init_params(TINY, seed=0)
    pipeline = EmbeddingsPipeline(TINY, params, EmbeddingsConfig(max_batch_size=4, min_length_bucket=8))
    return EmbeddingsTokenizer.from_file(path, max_length=pipeline.max_length), pipeline, params


def sentence(rng: np.random.Generator, lo: int = 1, hi: int = 20) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1)))) + "."


def contexts(tokenizer, texts: list[str], prefix: str = "r") -> dict:
    out = {}
    for i, text in enumerate(texts):
        request = TextGenerationRequest(f"{prefix}{i}", index=0, model_name="tiny-bert", prompt=text)
        out[request.request_id] = asyncio.run(tokenizer.new_context(request)) if i % 2 else \
            tokenizer.build_context(request)
    return out


encode_jit = jax.jit(encode, static_argnums=1)


def unpadded(params, cfg, ids: np.ndarray) -> np.ndarray:
    """The architecture on one exactly-sized row: no padding, no bucket."""
    return np.asarray(encode_jit(params, cfg, ids[None], np.array([ids.size], np.int32)))[0]


def test_plan_batches_is_optimal():
    """Against brute force over every way to cut the sorted rows into batches."""
    import itertools

    batch_buckets, length_buckets, call_cost = (1, 2, 4), (8, 16, 32), 32

    def cost(lengths, cuts):
        bounds = [0, *cuts, len(lengths)]
        total = 0
        for a, b in zip(bounds, bounds[1:]):
            if b - a > 4:
                return None
            total += min(x for x in batch_buckets if x >= b - a) * min(x for x in length_buckets
                                                                       if x >= lengths[b - 1]) + call_cost
        return total

    rng = np.random.default_rng(3)
    for _ in range(40):
        lengths = sorted(rng.integers(2, 33, size=int(rng.integers(1, 10))).tolist())
        plan = plan_batches(lengths, batch_buckets, length_buckets, call_cost)
        assert plan[0][0] == 0 and plan[-1][1] == len(lengths) and all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        costs = [c for k in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), k)
                 if (c := cost(lengths, cuts)) is not None]
        assert cost(lengths, [b for _, b in plan[:-1]]) == min(costs)
    assert plan_batches([5] * 30 + [100] * 2, (1, 2, 4, 8, 16, 32), (16, 32, 64, 128)) == [(0, 30), (30, 32)]


def test_protocols(tiny):
    tokenizer, pipeline, _ = tiny
    assert isinstance(pipeline, EmbeddingsGenerator)
    assert isinstance(tokenizer, PipelineTokenizer)
    assert pipeline.batch_buckets == (1, 2, 4) and pipeline.length_buckets == (8, 16, 32)


def test_tokenizer_overrides_file_settings_and_truncates(tiny):
    tokenizer, pipeline, _ = tiny
    ids = tokenizer.encode_text("the quick brown fox")
    assert ids.tolist() == [2, 6 + WORDS.index("the"), 6 + WORDS.index("quick"), 6 + WORDS.index("brown"),
                            6 + WORDS.index("fox"), 3]  # no padding to 12
    assert tokenizer.encode_text("").tolist() == [2, 3]
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(50))
    full = tokenizer.hf.tokenizer.encode(long_text).ids
    assert len(full) == 52  # file truncation (8) is off
    ids = tokenizer.encode_text(long_text)
    assert ids.tolist() == full[:31] + [3]
    ctx = tokenizer.build_context(TextGenerationRequest("long", index=0, model_name="m", prompt=long_text))
    assert ctx.prompt_tokens.tolist() == ids.tolist()


def test_pipeline_matches_unpadded_architecture(tiny):
    tokenizer, pipeline, params = tiny
    rng = np.random.default_rng(0)
    texts = ["", "dog.", " ".join(WORDS * 3)] + [sentence(rng, 3, 8) for _ in range(6)]  # 9 > max batch 4: split
    batch = contexts(tokenizer, texts)
    out = pipeline.encode(batch)
    assert list(out) == list(batch)
    for request_id, context in batch.items():
        vector = out[request_id]
        assert isinstance(vector, EmbeddingsOutput) and vector.is_done
        assert vector.embeddings.shape == (TINY.hidden_size,) and vector.embeddings.dtype == np.float32
        np.testing.assert_allclose(vector.embeddings, unpadded(params, TINY, context.prompt_tokens), atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(vector.embeddings), 1.0, atol=1e-6)


def test_batch_invariance(tiny):
    tokenizer, pipeline, _ = tiny
    rng = np.random.default_rng(1)
    probe = "the lazy cat sat on the mat."
    alone = pipeline.encode(contexts(tokenizer, [probe]))["r0"].embeddings
    for size in (2, 3, 4, 7, 9):
        texts = [sentence(rng, 1, 28) for _ in range(size)]
        position = int(rng.integers(0, size))
        texts[position] = probe
        got = pipeline.encode(contexts(tokenizer, texts))[f"r{position}"].embeddings
        np.testing.assert_allclose(got, alone, atol=1e-6)
    np.testing.assert_allclose(embed_texts(tokenizer, pipeline, probe)[0], alone, atol=1e-6)


def test_no_compiles_after_warmup(tiny):
    tokenizer, pipeline, _ = tiny
    compiled = pipeline.warmup()
    assert set(pipeline._programs) == set(pipeline.shapes()) and len(pipeline.shapes()) == 9
    assert compiled <= 9
    before = compile_count()
    rng = np.random.default_rng(2)
    for size in (1, 2, 3, 4, 5, 8, 13):
        pipeline.encode(contexts(tokenizer, [sentence(rng, 0, 40) for _ in range(size)]))
    assert compile_count() == before
    assert pipeline.warmup() == 0


def test_bad_inputs(tiny, tmp_path):
    tokenizer, pipeline, _ = tiny
    for texts, field in ((None, "texts"), ([], "texts is empty"), (["ok", 3], r"texts\[1\]"), (7, "texts")):
        with pytest.raises(ValueError, match=field):
            embed_texts(tokenizer, pipeline, texts)
    with pytest.raises(ValueError, match="batch must be a dict"):
        pipeline.encode([1, 2])
    with pytest.raises(ValueError, match=r"batch\['x'\].*prompt_tokens"):
        pipeline.encode({"x": "not a context"})
    good = contexts(tokenizer, ["dog."])
    bad = contexts(tokenizer, ["cat."], prefix="bad")
    bad["bad0"]._tokens[1] = TINY.vocab_size + 5  # an id the model has no row for
    with pytest.raises(ValueError, match=r"batch\['bad0'\].prompt_tokens has ids outside"):
        pipeline.encode({**good, **bad})
    with pytest.raises(ValueError, match="messages"):
        tokenizer.build_context(TextGenerationRequest("m", index=0, model_name="m",
                                                      messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(ValueError, match="prompt is required"):
        tokenizer.build_context(TextGenerationRequest("n", index=0, model_name="m"))
    with pytest.raises(ValueError, match=r"prompt token ids must be ints in \[0, "):
        tokenizer.build_context(TextGenerationRequest("t", index=0, model_name="m", prompt=[2, 999, 3]))
    with pytest.raises(ValueError, match="max_batch_size"):
        EmbeddingsConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        EmbeddingsPipeline(TINY, init_params(TINY, seed=1), EmbeddingsConfig(max_length=65))
    with pytest.raises(ValueError, match="is not a folder"):
        load_embeddings_pipeline(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_embeddings_pipeline(tmp_path)
    with pytest.raises(ValueError, match="model must be a folder path"):
        embed("hi", model=3)


# ---- real model ---------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Ünïcödé façade — naïve café in Zürich; 東京は日本の首都です。 Emoji: 🚀🔥 and Ελληνικά.",
    " ".join(f"token{i} is part of a very long passage about embeddings." for i in range(80)),  # > 256 pieces
    "Hi",
    "Sentence embeddings map text to vectors so that similar meanings lie close together.",
    "   leading and trailing whitespace   ",
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def reference(minilm_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.mark.slow
def test_minilm_pipeline_matches_sentence_transformers(minilm_dir, reference):
    tokenizer, pipeline = load_embeddings_pipeline(minilm_dir, max_batch_size=8)
    assert pipeline.max_length == 256 and pipeline.length_buckets == (16, 32, 64, 128, 256)
    expected = reference.encode(SENTENCES, convert_to_numpy=True)
    assert [len(tokenizer.encode_text(s)) for s in SENTENCES] == \
        [len(reference.tokenize([s])["input_ids"][0]) for s in SENTENCES]
    assert pipeline.warmup() == 20
    before = compile_count()
    cosines = []
    for i, text in enumerate(SENTENCES):  # alone
        got = pipeline.encode(contexts(tokenizer, [text]))["r0"].embeddings
        cosines.append(float(cosine(got, expected[i])))
    mixed = SENTENCES * 2  # 14 inputs: split over two batches
    out = pipeline.encode(contexts(tokenizer, mixed))
    got = np.stack([out[f"r{i}"].embeddings for i in range(len(mixed))])
    want = np.concatenate([expected, expected])
    cosines.extend(cosine(got, want).tolist())
    assert compile_count() == before, "the warmed pipeline compiled again"
    print(f"pipeline minimum cosine vs sentence-transformers: {min(cosines):.9f} (1 - cos = {1 - min(cosines):.1e})")
    assert min(cosines) >= 0.99999
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.slow
def test_embed_helper_default_model(reference):
    vectors = embed(["The quick brown fox jumps over the lazy dog.", ""])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[0][:4], [0.043934, 0.058934, 0.048178, 0.077548], atol=2e-6)
    np.testing.assert_allclose(vectors, reference.encode(["The quick brown fox jumps over the lazy dog.", ""]),
                               atol=2e-5)
    assert embed("Hi").shape == (1, 384)


@pytest.mark.slow
def test_bench_embed_quick(tmp_path, minilm_dir):  # the default model
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_embed", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_embed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--json", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [row["sentences"] for row in saved["results"]] == [1, 8]
    for row in result["results"]:
        assert row["maxjax_per_s"] > 0 and row["sentence_transformers_per_s"] > 0
        assert row["max_abs_diff"] < 2e-5
