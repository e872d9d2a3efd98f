"""The precision policy read from the programs themselves: with float32, every dot and convolution of every
compiled program (prefill, decode, Model.logits, embeddings, SNAC) asks for full float32 precision, so TF32 or
bf16 passes cannot sneak in on a GPU/TPU; "default" is there only when asked for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax import models
from maxjax.architectures import bert, llama
from maxjax.runtime import hlo_stats
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16)
RUNTIME = dict(max_batch_size=2, max_seq_len=32, max_num_steps=2, length_buckets=(32,), max_prefill_len=32)


@pytest.fixture(autouse=True)
def no_global_precision():
    """The suite sets a global default precision (conftest.py); these checks must see the runtime's own."""
    with jax.default_matmul_precision(None):
        yield


def _engine(**fields):
    return Engine(llama, CFG, llama.init_params(CFG, jax.random.key(0)), RuntimeConfig(**RUNTIME, **fields))


def _assert_all(precisions, expected):
    assert precisions, "the program has no dot"
    assert set(precisions) == {expected}, precisions


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_float32_text_programs_use_highest_precision_dots(quantize):
    engine = _engine(quantize=quantize)
    for kind, shape in (("prefill", (1, 32, 32)), ("decode", (1, 32))):
        _assert_all(hlo_stats.stablehlo_dot_precisions(engine.lower(kind, shape).as_text()), "HIGHEST")
    # And XLA keeps it through its passes (read from the CPU compiler's HLO, whose dots stay `dot` instructions;
    # GPU/TPU get the same lowered module, and the GPU compiler rewrites dots into library calls).
    if jax.default_backend() == "cpu":
        _assert_all(hlo_stats.hlo_dot_precisions(engine.lower("decode", (1, 32)).compile().as_text()), "highest")


def test_fast_passes_only_when_asked_for():
    engine = _engine(matmul_precision="default")
    _assert_all(hlo_stats.stablehlo_dot_precisions(engine.lower("decode", (1, 32)).as_text()), "DEFAULT")
    bf16 = _engine(dtype="bfloat16")  # bfloat16 is one pass already: no precision is forced on it
    assert bf16.config.matmul_precision == "default"


def test_model_logits_embeddings_and_snac_programs_use_highest_precision_dots():
    params = llama.init_params(CFG, jax.random.key(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    lowered = models._forward_logits.lower(params, CFG, tokens, tokens, kv_len=8, precision="highest")
    _assert_all(hlo_stats.stablehlo_dot_precisions(lowered.as_text()), "HIGHEST")

    from maxjax.pipelines.embeddings import EmbeddingsPipeline

    tiny = bert.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                           max_position_embeddings=64, pooling="mean", normalize=True, max_seq_length=32)
    embeddings = EmbeddingsPipeline(tiny, bert.init_params(tiny))
    _assert_all(hlo_stats.stablehlo_dot_precisions(embeddings.lower(1, 16).as_text()), "HIGHEST")

    from maxjax.architectures.snac import SnacConfig
    from maxjax.pipelines.orpheus_random import random_snac_state
    from maxjax.runtime.snac_decoder import SnacDecoder
    from maxjax.weights.snac import params_from_torch_state

    snac_cfg = SnacConfig()
    snac_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                               params_from_torch_state(random_snac_state(snac_cfg), snac_cfg))
    decoder = SnacDecoder(snac_params, snac_cfg, frame_buckets=(4,), batch_buckets=(1,))
    _assert_all(hlo_stats.stablehlo_dot_precisions(decoder.lower(1, 4).as_text()), "HIGHEST")


def test_dtype_auto_and_precision_validation(monkeypatch):
    expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"  # the backend this suite runs on
    assert RuntimeConfig(dtype="auto").dtype == expected
    assert RuntimeConfig().matmul_precision == "highest"
    for backend, dtype, precision in (("cpu", "float32", "highest"), ("gpu", "bfloat16", "default"),
                                      ("tpu", "bfloat16", "default")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        auto = RuntimeConfig(dtype="auto")
        assert (auto.dtype, auto.matmul_precision) == (dtype, precision), backend
    with pytest.raises(ValueError, match="matmul_precision"):
        RuntimeConfig(matmul_precision="tf32")
    with pytest.raises(ValueError, match="dtype"):
        RuntimeConfig(dtype="float16")


def test_cli_precision_flags():
    from maxjax.cli import build_parser

    args = build_parser().parse_args(["generate", "hi", "--dtype", "auto", "--matmul-precision", "high",
                                      "--quantize", "gguf"])
    assert (args.dtype, args.matmul_precision, args.quantize) == ("auto", "high", "gguf")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--matmul-precision", "tf32"])
