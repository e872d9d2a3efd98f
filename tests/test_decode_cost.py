"""The decode step's fixed cost, read from the compiled program (``hlo_stats.decode_step_profile``): kernels per
step per layer are what the layer is meant to launch (native calls only, or XLA fusions without copies), no
weight or cache is copied per step, and the counts stay under bounds measured on one jax version (so a change
that adds per-step kernels fails here; the same for a prefill's kernels per layer); and the deferred cache write
(one scatter per step for all layers) gives the same tokens and the same cache as writing each layer's K/V
before its attention (the scanned decode path)."""

import dataclasses
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import unavailable

from maxjax.architectures import llama, panels
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.kernels import native
from maxjax.runtime import hlo_stats
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
RUNTIME = RuntimeConfig(max_batch_size=4, max_seq_len=32, max_num_steps=4, length_buckets=(32,),
                        max_prefill_len=32, batch_buckets=(4,))
SHAPE = (4, 32)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"

# What a layer of a greedy decode step is, whatever the jax version: with the native CPU kernels exactly five
# custom calls (the four products with their norms, residuals and SwiGLU, and the attention with its rotary
# embedding) and no other operation; with XLA ops only, fusions (and dots) and no copy. The number of XLA
# fusions is XLA's own decision and changes between jax versions, so the counts below are a record of one version
# (jax 0.10.2 on XLA CPU: the greedy branch of the tiny model above, batch 4, span 32, built for 2 and 3 layers),
# asserted only on it: 28 per layer with XLA ops only (30 when each layer scattered its K/V into the cache) and
# 53 outside the layers (embedding, final norm, lm_head, greedy sampling, loop bookkeeping and the one deferred
# cache write); 55 outside with the native kernels.
NATIVE_CALLS_PER_LAYER = {"decode": 5, "prefill": 6}
MEASURED_ON = "0.10.2"
MAX_KERNELS_PER_LAYER = {"0": 28, "1": 5}
MAX_KERNELS_OUTSIDE_LAYERS = 55
# A prefill of one 32-token row: with the native kernels 6 custom calls per layer (the four products, the cache
# write from the fused projection, and the attention, which rotates q from the projection and reads K/V from the
# cache in place); 10 when k's rotation, v's layout and their two scatters were XLA kernels. XLA ops only: 31
# kernels per layer on jax 0.10.2.
MAX_PREFILL_KERNELS_PER_LAYER = {"0": 31, "1": 6}


CPU_COUNTS = pytest.mark.skipif(jax.default_backend() != "cpu", reason="counted in XLA:CPU's compiled program "
                                "(its fusions, the native CPU kernels); other compilers fuse differently")


def _per_layer(two: dict, three: dict) -> dict:
    """The operations one more layer adds, by opcode (the same program built for 2 and 3 layers)."""
    return {op: three.get(op, 0) - two.get(op, 0) for op in set(two) | set(three) if three.get(op, 0) != two.get(op, 0)}


def _engine(num_layers: int, **runtime) -> Engine:
    cfg = dataclasses.replace(CFG, num_layers=num_layers)
    return Engine(llama, cfg, llama.init_params(cfg, jax.random.key(0)), dataclasses.replace(RUNTIME, **runtime))


@CPU_COUNTS
@pytest.mark.parametrize("native_kernels", ["0", "1"])
def test_decode_kernels_per_step_stay_under_their_bounds(monkeypatch, native_kernels):
    """Counted as bench_generate.py counts them: the program built for 2 and 3 layers, with XLA ops only and
    with the native CPU kernels."""
    monkeypatch.setenv(native.ENABLE_ENV, native_kernels)
    if native_kernels == "1" and native.ffi_target(panels.TARGET) is None:
        unavailable("no C++ compiler: the native kernels are unavailable")
    split = runpy.run_path(str(BENCH))["layer_split"](_engine(3), *SHAPE)
    two, three = split["profiles"]
    layer = _per_layer(two["by_opcode"], three["by_opcode"])
    if native_kernels == "1":  # each layer is its native calls and nothing else
        assert layer == {"custom-call": NATIVE_CALLS_PER_LAYER["decode"]}, layer
    else:  # XLA's fusions (and dots) only: no copy, gather or scatter kernel, no custom call per layer
        assert set(layer) <= {"fusion", "dot"}, layer
    if jax.__version__ == MEASURED_ON:  # XLA's fusion decisions of the version the counts were measured on
        assert split["per_layer"] <= MAX_KERNELS_PER_LAYER[native_kernels], (split["per_layer"], layer)
        assert split["outside_layers"] <= MAX_KERNELS_OUTSIDE_LAYERS, (split["outside_layers"], two["by_opcode"])
    # No weight or cache is copied per step and no loop runs inside a greedy step. XLA's attention moves one
    # layer's K/V reads per layer (a gather of [B, KVH, span, Dh] with the new key appended, twice); the
    # native attention reads the cache in place and moves nothing.
    for profile in split["profiles"]:
        assert profile["weight_copy_bytes"] == profile["state_copy_bytes"] == 0
        assert profile["inner_loop_iterations"] == 0
    kv_read = 2 * 4 * CFG.num_kv_heads * (SHAPE[1] + 1) * CFG.head_dim * 4  # bytes, per layer
    moved = three["moved_bytes"] - two["moved_bytes"]
    if native_kernels == "0":
        assert kv_read <= moved <= 1.25 * kv_read
    else:
        assert moved < 0.25 * kv_read, moved


@CPU_COUNTS
def test_scanned_decode_shows_its_weight_copies():
    """The proxy sees what it is meant to see: a scanned layer body reads each layer's weights out of the
    stacked arrays every step (at least every matrix of every layer)."""
    scanned = hlo_stats.decode_step_profile(_engine(2, scan_decode_layers=True).compiled_text("decode", SHAPE))
    matrices = sum(a.nbytes for a in jax.tree.leaves(llama.fuse_projections(
        llama.init_params(CFG, jax.random.key(0)))["layers"]) if a.ndim == 3)
    assert scanned["weight_copy_bytes"] >= matrices


def _run(pipe: TextGenerationPipeline, prompts, sampling, new_tokens=(12, 5, 9)):
    """Greedy and sampled rows of unequal lengths, stopping at different steps, several calls of 4 steps."""
    contexts = {f"r{i}": TextContext(f"r{i}", np.array(p, np.int32), max_length=len(p) + n, sampling_params=s)
                for i, (p, s, n) in enumerate(zip(prompts, sampling, new_tokens))}
    tokens = {rid: [] for rid in contexts}
    live = dict(contexts)
    while live:
        for rid, out in pipe.next_token(TextGenerationInputs(dict(live), 4)).items():
            tokens[rid] += out.tokens
            if out.is_done:
                del live[rid]
    slots = [contexts[rid].cache_seq_id for rid in contexts]
    cache = jax.tree.map(lambda a: np.asarray(a)[:, slots], pipe.engine.cache)
    return tokens, cache


def test_deferred_cache_write_equals_writing_before_attention():
    # A sliding layer (window 6: its keys are gathered from a window span) and a global one.
    cfg = dataclasses.replace(CFG, sliding_window=6, layer_types=("sliding_attention", "full_attention"))
    params = llama.init_params(cfg, jax.random.key(1))
    params = dict(params, lm_head=params["lm_head"] * 8)  # varied greedy text
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 128, n).tolist() for n in (7, 3, 11)]
    sampling = [SamplingParams(top_k=1), SamplingParams(top_k=20, temperature=0.9, seed=5),
                SamplingParams(top_k=0, top_p=0.8, seed=2)]
    deferred = _run(TextGenerationPipeline(Engine(llama, cfg, params, RUNTIME)), prompts, sampling)
    written = _run(TextGenerationPipeline(Engine(llama, cfg, params, dataclasses.replace(
        RUNTIME, scan_decode_layers=True))), prompts, sampling)
    assert deferred[0] == written[0]
    assert [len(t) for t in deferred[0].values()] == [12, 5, 9]
    for a, b in zip(deferred[1], written[1]):  # every written position, and nothing else, holds the same K/V
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@CPU_COUNTS
@pytest.mark.parametrize("native_kernels", ["0", "1"])
def test_prefill_kernels_per_layer_stay_under_their_bounds(monkeypatch, native_kernels):
    monkeypatch.setenv(native.ENABLE_ENV, native_kernels)
    if native_kernels == "1" and native.ffi_target(panels.TARGET) is None:
        unavailable("no C++ compiler: the native kernels are unavailable")
    ops = []
    for layers in (2, 3):
        engine = _engine(layers)
        ops.append(hlo_stats.program_ops(engine.compiled_text("prefill", engine.config.prefill_shapes()[-1])))
    layer = _per_layer(*ops)
    if native_kernels == "1":  # each layer is its native calls and nothing else
        assert layer == {"custom-call": NATIVE_CALLS_PER_LAYER["prefill"]}, layer
    else:  # XLA's fusions (and dots) only
        assert set(layer) <= {"fusion", "dot"}, layer
    if jax.__version__ == MEASURED_ON:
        assert sum(layer.values()) <= MAX_PREFILL_KERNELS_PER_LAYER[native_kernels], layer
