"""Checks that need several devices, run in a subprocess started by tests/test_sharding.py.

JAX fixes its device count when it starts, so the test sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` for this process only. Each check prints one JSON
line of measured values; the assertions (and their tolerances) live in the test.

    python tests/mesh_worker.py tiny | smollm2 GGUF | load TMPDIR | embed MINILM_DIR | multihost HOST:PORT PROCESS_ID
                                | moe TMPDIR
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import llama, llama_sharding
from maxjax.context import TextContext
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.text import TextGenerationPipeline
from maxjax.runtime.compile_cache import compile_count, enable_compile_cache
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine
from maxjax.runtime.mesh import make_mesh
from maxjax.runtime.sharded import restore_shardings

TINY = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                         num_kv_heads=4, head_dim=8, tie_word_embeddings=False)
TINY_RUNTIME = dict(max_batch_size=4, max_seq_len=32, max_num_steps=4, length_buckets=(32,), batch_buckets=(4,))


def tiny_params() -> dict:
    params = llama.init_params(TINY, jax.random.key(0))
    return dict(params, lm_head=params["lm_head"] * 8)  # varied greedy text


def engine(cfg, params, tp: int, dp: int = 1, **runtime) -> Engine:
    config = RuntimeConfig(tensor_parallel=tp, data_parallel=dp, **{**TINY_RUNTIME, **runtime})
    if config.num_devices == 1:
        params = jax.device_put(params)  # as load_pipeline does
    return Engine(llama, cfg, params, config, layout=llama_sharding)


def generate(eng: Engine, prompts: list[np.ndarray], max_new: int, num_steps: int, logprobs: int = 2,
             **sampling) -> dict:
    """Tokens and the chosen tokens' log-probabilities of every prompt, driven through next_token."""
    pipe = TextGenerationPipeline(eng)
    contexts = {f"r{i}": TextContext(f"r{i}", p, max_length=len(p) + max_new, log_probabilities=logprobs,
                                     sampling_params=SamplingParams(**sampling)) for i, p in enumerate(prompts)}
    tokens = {rid: [] for rid in contexts}
    logprobs = {rid: [] for rid in contexts}
    while any(not ctx.is_done for ctx in contexts.values()):
        live = {rid: ctx for rid, ctx in contexts.items() if not ctx.is_done}
        for rid, out in pipe.next_token(TextGenerationInputs(live, num_steps=num_steps)).items():
            tokens[rid] += [int(t) for t in out.tokens]
            logprobs[rid] += [lp for entry in out.log_probabilities or [] for lp in entry.token_log_probabilities]
    for rid in contexts:
        pipe.release(rid)
    return {"tokens": tokens, "logprobs": logprobs}


def full_logits(eng: Engine, tokens: np.ndarray) -> np.ndarray:
    """An uncached forward over ``tokens`` [B, T] with the engine's (possibly sharded, rewritten) params."""
    cfg = eng.model_config
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)

    @jax.jit
    def forward(params, tokens, positions):
        cache = llama.init_kv_cache(cfg, tokens.shape[0], tokens.shape[1])
        slots = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        return llama.forward(params, cfg, tokens, positions, cache, slots, kv_len=tokens.shape[1])[0]

    return np.asarray(forward(eng.params, tokens, positions))


def spec_names(array: jax.Array) -> list[str | None]:
    spec = getattr(array.sharding, "spec", ())  # a single-device array has no PartitionSpec
    return [a if isinstance(a, str) else None for a in spec]


def shard_bytes(eng: Engine) -> dict:
    """Per array: the sharding spec and (bytes on the first device, total bytes)."""
    first = jax.devices()[0]

    def describe(array: jax.Array) -> dict:
        on_first = sum(s.data.nbytes for s in array.addressable_shards if s.device == first)
        return {"spec": spec_names(array),
                "device_bytes": int(on_first), "total_bytes": int(array.nbytes)}

    leaves = [describe(a) for a in jax.tree.leaves(eng.params)]
    return {"layer0": {key: describe(value) for key, value in eng.params["layers"][0].items()},
            "embed": describe(eng.params["embed"]), "lm_head": describe(eng.params["lm_head"]),
            "cache_k": describe(eng.cache.k), "counts": describe(eng.counts),
            "params_device_bytes": sum(d["device_bytes"] for d in leaves),
            "params_total_bytes": sum(d["total_bytes"] for d in leaves)}


def native_kernels_in_decode(eng: Engine) -> bool:
    """Whether the engine's first decode program calls a native kernel (custom call target "maxjax_...")."""
    shape = next(shape for kind, shape in eng.all_shapes() if kind == "decode")
    return "maxjax_" in eng.lower("decode", shape).as_text()


def check_tiny() -> dict:
    """8 heads / 4 kv heads at tp 2, 4, 8 (kv heads replicated at 8) and on a (2, 2) mesh vs one device; the
    (2, 2) engine has two length buckets, is warmed up first and counts compiles after."""
    params = tiny_params()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, TINY.vocab_size, size=n).astype(np.int32) for n in (5, 11, 3)]
    tokens = np.stack([rng.integers(4, TINY.vocab_size, size=24).astype(np.int32) for _ in range(2)])
    seeded = dict(top_k=50, temperature=0.9, seed=7)
    single = engine(TINY, params, 1)
    reference = {"logits": full_logits(single, tokens), "greedy": generate(single, prompts, 10, 4),
                 "seeded": generate(single, prompts, 10, 4, **seeded)}
    result = {}
    for tp, dp in ((2, 1), (4, 1), (8, 1), (2, 2)):
        buckets = dict(length_buckets=(16, 32), max_prefill_len=16) if dp > 1 else {}
        eng = engine(TINY, params, tp, dp, **buckets)
        programs = eng.warmup(workers=2) if dp > 1 else None
        before = compile_count()
        greedy, sampled = generate(eng, prompts, 10, 4), generate(eng, prompts, 10, 4, **seeded)
        generate(eng, [rng.integers(4, TINY.vocab_size, size=n).astype(np.int32) for n in (20, 2)], 5, 3,
                 logprobs=0, top_p=0.5, top_k=0, seed=1)  # chunked prefill, no log-probabilities
        compiles = compile_count() - before
        lp_error = max(abs(a - b) for rid, ref in reference["greedy"]["logprobs"].items()
                       for a, b in zip(ref, greedy["logprobs"][rid]))
        result[f"{tp}x{dp}"] = {
            "heads": [eng.model_config.num_heads, eng.model_config.num_kv_heads],
            "logits_error": float(np.abs(full_logits(eng, tokens) - reference["logits"]).max()),
            "logprob_error": float(lp_error),
            "greedy_equal": greedy["tokens"] == reference["greedy"]["tokens"],
            "seeded_equal": sampled["tokens"] == reference["seeded"]["tokens"],
            "bytes": shard_bytes(eng),
            "programs": programs, "expected_programs": len(eng.all_shapes()), "compiles_after_warmup": compiles,
            "native_kernels": native_kernels_in_decode(eng),
        }
    result["native_kernels_on_one_device"] = native_kernels_in_decode(single)
    result["greedy_tokens"] = reference["greedy"]["tokens"]
    result["seeded_tokens"] = reference["seeded"]["tokens"]
    return result


def release_host_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise: CPU devices' buffers are
    host memory, and this process builds one model after another)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_smollm2(gguf: str) -> dict:
    """Real SmolLM2 (9 heads, 3 kv heads) greedy through next_token on several meshes vs one device."""
    from maxjax.tokenizers import HFTokenizer
    from maxjax.weights import load_weights

    weights = load_weights(gguf, "float32")
    tokenizer: HFTokenizer = weights.tokenizer
    texts = ["The three primary colors are", "def fibonacci(n):", "Paris is the capital of"]
    prompts = [np.asarray(tokenizer.encode_text(t), np.int32) for t in texts]
    runtime = dict(max_batch_size=4, max_seq_len=64, length_buckets=(64,), batch_buckets=(4,), max_num_steps=8,
                   scan_decode_layers=True, scan_prefill_layers=True)
    # Scanned layers compile in seconds: this check is about layouts (check_tiny runs unrolled layers on meshes).
    out = {}
    for tp, dp in ((1, 1), (3, 1), (1, 2), (3, 2), (2, 1)):
        eng = engine(weights.config, weights.params, tp, dp, **runtime)
        out[f"{tp}x{dp}"] = {"tokens": generate(eng, prompts, 12, 8)["tokens"],
                             "heads": [eng.model_config.num_heads, eng.model_config.num_kv_heads],
                             "embed_spec": spec_names(eng.params["embed"])}
        del eng
        release_host_memory()  # the previous mesh's arrays go before the next mesh's arrive
    return out


LOAD = llama.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=64, tie_word_embeddings=False, max_position_embeddings=256)


def write_sources(folder: Path, params: dict) -> dict[str, Path]:
    """The same float32 params as an HF safetensors folder, a GGUF file and a model store."""
    import gguf

    from maxjax.weights.llama_names import checkpoint_tensors
    from maxjax.weights.safetensors_dir import save_safetensors_dir
    from maxjax.weights.store import save_store

    hf = save_safetensors_dir(folder / "hf", LOAD, params)
    # qwen2: a GGUF architecture without llama.cpp's Q/K row permutation, so the rows are written as they are
    writer = gguf.GGUFWriter(str(folder / "m.gguf"), "qwen2")
    for key, value in {"block_count": LOAD.num_layers, "context_length": 256, "embedding_length": LOAD.hidden_size,
                       "feed_forward_length": LOAD.intermediate_size, "attention.head_count": LOAD.num_heads,
                       "attention.head_count_kv": LOAD.num_kv_heads, "vocab_size": LOAD.vocab_size}.items():
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_float32("qwen2.rope.freq_base", LOAD.rope_theta)
    writer.add_float32("qwen2.attention.layer_norm_rms_epsilon", LOAD.rms_norm_eps)
    for name, array in checkpoint_tensors(params, "gguf").items():
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    store = save_store(folder / "store", "llama", LOAD, params, None, "test")
    return {"gguf": folder / "m.gguf", "hf": hf, "store": store}


def check_load(folder: str) -> dict:
    """GGUF, safetensors and store loaded tensor by tensor onto meshes: params equal to the source, and the
    host's peak allocation (tracemalloc: numpy and Python buffers, not XLA's) during each load."""
    import tracemalloc

    from maxjax.weights import load_weights

    params = jax.tree.map(np.asarray, llama.init_params(LOAD, jax.random.key(3)))
    sources = write_sources(Path(folder), params)
    out = {"model_bytes": int(sum(a.nbytes for a in jax.tree.leaves(params))), "runs": {}}
    for tp, dp in ((2, 2), (4, 1)):
        config = RuntimeConfig(tensor_parallel=tp, data_parallel=dp, max_batch_size=4, max_seq_len=32,
                               length_buckets=(32,), batch_buckets=(4,))
        expected = Engine(llama, LOAD, params, config, layout=llama_sharding).params
        for kind, path in sources.items():
            tracemalloc.start()
            start = time.perf_counter()
            mesh = make_mesh(config)
            weights = load_weights(path, "float32", with_tokenizer=False, lazy=True,
                                   store_shardings=lambda cfg: restore_shardings(llama, llama_sharding, cfg, mesh))
            eng = Engine(llama, weights.config, weights.params, config, layout=llama_sharding)
            jax.block_until_ready(eng.params)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))
                                                               and a.sharding == b.sharding), eng.params, expected))
            out["runs"][f"{kind} {tp}x{dp}"] = {"equal": same, "peak_bytes": int(peak), "seconds": seconds,
                                               "heads": [eng.model_config.num_heads, eng.model_config.num_kv_heads]}
    tracemalloc.start()
    load_weights(sources["gguf"], "float32", with_tokenizer=False)
    out["whole_tree_peak_bytes"] = int(tracemalloc.get_traced_memory()[1])  # the single-device path, for scale
    tracemalloc.stop()
    return out


def check_embed(folder: str) -> dict:
    """all-MiniLM-L6-v2 with each batch split over 4 devices vs one device."""
    from maxjax.pipelines.embeddings import embed_texts, load_embeddings_pipeline

    texts = ["a cat", "The quick brown fox jumps over the lazy dog.", "a dog", "maxjax on many devices", "x"]
    single = embed_texts(*load_embeddings_pipeline(folder, max_batch_size=8), texts)
    tokenizer, pipeline = load_embeddings_pipeline(folder, max_batch_size=8, data_parallel=4)
    split = embed_texts(tokenizer, pipeline, texts)
    cosine = np.sum(single * split, axis=1) / np.linalg.norm(single, axis=1) / np.linalg.norm(split, axis=1)
    return {"min_cosine": float(cosine.min()), "max_abs": float(np.abs(single - split).max()),
            "batch_buckets": list(pipeline.batch_buckets),
            "devices": len(jax.tree.leaves(pipeline._params)[0].sharding.device_set)}


def check_multihost() -> dict:
    """One of two processes (4 devices each) sharing a (2, 4) mesh: greedy tokens of the tiny model's prompts."""
    params = jax.tree.map(np.asarray, tiny_params())  # the same host values on every process
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, TINY.vocab_size, size=n).astype(np.int32) for n in (5, 11, 3)]
    eng = engine(TINY, params, 4, 2)
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": len(jax.local_devices()), "greedy": generate(eng, prompts, 10, 4)["tokens"]}


def check_moe(folder: str) -> dict:
    """A tiny random Qwen3-MoE (transformers' classes, 8 experts of width 30, top-2) at tp 2 and 4 (width padded
    to 32) vs one device: uncached logits, greedy tokens through next_token, and where the expert weights live."""
    import torch
    import transformers

    from maxjax.weights import load_weights

    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=30,
        norm_topk_prob=True, initializer_range=0.15, tie_word_embeddings=False)
    torch.manual_seed(6)  # a seed whose greedy text varies
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    weights = load_weights(folder, with_tokenizer=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, config.vocab_size, size=n).astype(np.int32) for n in (5, 11, 3)]
    tokens = np.stack([rng.integers(4, config.vocab_size, size=24).astype(np.int32) for _ in range(2)])
    single = engine(weights.config, weights.params, 1)
    reference = {"logits": full_logits(single, tokens), "greedy": generate(single, prompts, 10, 4)["tokens"]}
    result = {"greedy_tokens": reference["greedy"], "experts_original_bytes": sum(
        weights.params["layers"][k][0].nbytes for k in ("e_gate", "e_up", "e_down"))}
    for tp in (2, 4):
        eng = engine(weights.config, weights.params, tp)
        result[f"{tp}x1"] = {
            "expert_width": eng.model_config.moe_intermediate_size,
            "logits_error": float(np.abs(full_logits(eng, tokens) - reference["logits"]).max()),
            "greedy_equal": generate(eng, prompts, 10, 4)["tokens"] == reference["greedy"],
            "bytes": shard_bytes(eng)["layer0"]}
    return result


if __name__ == "__main__":
    check = sys.argv[1]
    if check == "multihost":  # python mesh_worker.py multihost COORDINATOR PROCESS_ID (2 processes)
        import maxjax.distributed

        maxjax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
    enable_compile_cache(None)  # MAXJAX_COMPILE_CACHE: the test gives each run its own folder
    assert len(jax.devices()) >= 8, "start with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    result = {"tiny": check_tiny, "smollm2": lambda: check_smollm2(sys.argv[2]),
              "multihost": check_multihost, "load": lambda: check_load(sys.argv[2]),
              "embed": lambda: check_embed(sys.argv[2]), "moe": lambda: check_moe(sys.argv[2])}[check]()
    print("RESULT " + json.dumps(result))
