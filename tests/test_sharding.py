"""Multi-device runs on forced CPU devices: layouts, parity with one device, compiles, bad configs.

The device checks run in a subprocess (``tests/mesh_worker.py``) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, since JAX fixes its device count at start, and a
compile cache of this test run's own.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from maxjax.architectures import llama, llama_sharding, moe
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.engine import Engine

WORKER = Path(__file__).with_name("mesh_worker.py")
LOGITS_TOL = 1e-5  # float32, same weights, summation order differs between shards


def start_worker(tmp_path_factory, *args: str, devices: int = 8) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               MAXJAX_COMPILE_CACHE=str(tmp_path_factory.mktemp("cc")), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def worker_result(proc: subprocess.Popen, timeout: int = 600) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_worker(tmp_path_factory, *args: str) -> dict:
    return worker_result(start_worker(tmp_path_factory, *args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return run_worker(tmp_path_factory, "tiny")


@pytest.mark.parametrize("mesh", ["2x1", "4x1", "8x1", "2x2"])
def test_tiny_llama_on_a_mesh_matches_one_device(tiny, mesh):
    run = tiny[mesh]
    assert run["logits_error"] <= LOGITS_TOL
    assert run["logprob_error"] <= LOGITS_TOL
    assert run["greedy_equal"] and run["seeded_equal"]
    # tp 8 > 4 kv heads: each kv head is stored twice, one per shard; 8 query heads need no padding
    assert run["heads"] == ([8, 8] if mesh == "8x1" else [8, 4])


def test_mesh_programs_call_no_native_kernel(tiny):
    """XLA's partitioner cannot split a custom call (it would gather the KV cache onto every device), so mesh
    programs keep XLA's attention; the single-device reference uses the native kernels (CPU, a compiler)."""
    assert not any(tiny[mesh]["native_kernels"] for mesh in ("2x1", "4x1", "8x1", "2x2"))
    assert tiny["native_kernels_on_one_device"] or not shutil.which("c++")


def test_reference_tokens_are_not_degenerate(tiny):
    for tokens in (tiny["greedy_tokens"], tiny["seeded_tokens"]):
        assert all(len(set(row)) > 3 for row in tokens.values())
    assert tiny["greedy_tokens"] != tiny["seeded_tokens"]


@pytest.mark.parametrize("mesh", ["2x1", "4x1", "8x1", "2x2"])
def test_params_and_kv_cache_are_split_not_replicated(tiny, mesh):
    tp, dp = map(int, mesh.split("x"))
    info = tiny[mesh]["bytes"]
    layer = info["layer0"]
    for key in ("wq", "wk", "wv", "w_gate", "w_up"):
        assert layer[key]["spec"] == [None, "model"], key
    for key in ("wo", "w_down"):
        assert layer[key]["spec"] == ["model", None], key
    assert layer["attn_norm"]["spec"] == [None] and info["embed"]["spec"] == ["model", None]
    assert info["lm_head"]["spec"] == [None, "model"]
    for key in ("wq", "wk", "wo", "w_up", "w_down"):
        assert layer[key]["device_bytes"] * tp == layer[key]["total_bytes"], key
    assert info["embed"]["device_bytes"] * tp == info["embed"]["total_bytes"]
    # everything but the norms is split: a device holds ~1/tp of the params
    assert info["params_device_bytes"] <= info["params_total_bytes"] / tp * 1.05
    assert info["cache_k"]["spec"] == [None, "data", "model", None, None]
    assert info["cache_k"]["device_bytes"] * tp * dp == info["cache_k"]["total_bytes"]
    assert info["counts"]["device_bytes"] * tp * dp == info["counts"]["total_bytes"]


def test_no_compiles_after_warmup_on_a_mesh(tiny):
    run = tiny["2x2"]
    assert run["programs"] == run["expected_programs"] == 2 + 2  # prefill and decode, two length buckets
    assert run["compiles_after_warmup"] == 0


def test_two_processes_share_one_mesh_and_match_one_device(tiny, tmp_path_factory):
    """Two processes on localhost, 4 CPU devices each, joined by maxjax.distributed.initialize (gloo
    collectives) into one (2, 4) mesh: both read the same greedy tokens, equal to one device's."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [start_worker(tmp_path_factory, "multihost", f"localhost:{port}", str(i), devices=4) for i in range(2)]
    results = [worker_result(proc) for proc in procs]
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["processes"] == 2 and r["local_devices"] == 4 for r in results)
    for r in results:
        assert r["greedy"] == tiny["greedy_tokens"]


@pytest.mark.slow
def test_smollm2_greedy_on_meshes_equals_one_device(tmp_path_factory, smollm2_gguf):
    runs = run_worker(tmp_path_factory, "smollm2", str(smollm2_gguf))
    single = runs.pop("1x1")
    assert all(len(tokens) == 12 for tokens in single["tokens"].values())
    assert len({len(t) for t in single["tokens"].values()}) == 1
    for mesh, run in runs.items():
        assert run["tokens"] == single["tokens"], mesh
    assert runs["3x1"]["heads"] == [9, 3]  # 3 heads and 1 kv head per shard: no rewrite
    assert runs["2x1"]["heads"] == [12, 6]  # kv heads replicated twice, 3 padding query heads
    assert runs["3x2"]["embed_spec"] == ["model", None]


def test_gguf_safetensors_and_store_load_onto_a_mesh_tensor_by_tensor(tmp_path_factory):
    """Identical params (values and shardings) from the three sources, on a mesh whose layout keeps the heads
    (2x2: the store restores straight onto the shards) and one that replicates kv heads (4x1)."""
    result = run_worker(tmp_path_factory, "load", str(tmp_path_factory.mktemp("sources")))
    runs = result["runs"]
    assert set(runs) == {f"{kind} {mesh}" for kind in ("gguf", "hf", "store") for mesh in ("2x2", "4x1")}
    for name, run in runs.items():
        assert run["equal"], name
        assert run["heads"] == ([4, 2] if "2x2" in name else [4, 4]), name
    # GGUF and safetensors hold one tensor (plus its shards) on the host at a time: the host's peak
    # allocation stays well below the float32 model, which the single-device path assembles whole.
    for name in ("gguf 2x2", "gguf 4x1", "hf 2x2", "hf 4x1"):
        assert runs[name]["peak_bytes"] < 0.75 * result["model_bytes"], name
    assert result["whole_tree_peak_bytes"] > 0.8 * result["model_bytes"]


@pytest.mark.slow
def test_embeddings_split_over_data_devices_equal_one_device(tmp_path_factory, minilm_dir):
    result = run_worker(tmp_path_factory, "embed", str(minilm_dir))
    assert result["devices"] == 4 and result["batch_buckets"] == [4, 8]
    assert result["min_cosine"] >= 0.99999 and result["max_abs"] <= 1e-5


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return run_worker(tmp_path_factory, "moe", str(tmp_path_factory.mktemp("qwen3_moe")))


@pytest.mark.parametrize("mesh", ["2x1", "4x1"])
def test_tiny_moe_on_a_mesh_matches_one_device_with_experts_split(tiny_moe, mesh):
    """Qwen3-MoE, 8 experts of width 30: split 15 + 15 at tp 2, padded to 32 and split 8 x 4 at tp 4."""
    tp = int(mesh[0])
    run = tiny_moe[mesh]
    assert run["logits_error"] <= LOGITS_TOL
    assert run["greedy_equal"]
    assert run["expert_width"] == (30 if tp == 2 else 32)
    layer = run["bytes"]
    assert layer["e_gate"]["spec"] == layer["e_up"]["spec"] == [None, None, "model"]
    assert layer["e_down"]["spec"] == [None, "model", None]
    assert layer["router"]["spec"] == [None, None]
    experts = [layer[key] for key in ("e_gate", "e_up", "e_down")]
    for info in experts:  # each device holds exactly its 1/tp of every expert tensor
        assert info["device_bytes"] * tp == info["total_bytes"]
    # vs the unpadded experts: 1/tp (tp 2), 8/30 with the 2 padding columns (tp 4); replicated would be 1
    assert sum(info["device_bytes"] for info in experts) <= tiny_moe["experts_original_bytes"] / tp * 1.07
    assert all(len(set(row)) > 3 for row in tiny_moe["greedy_tokens"].values())


# -- in this process (one device): configs refused before anything is placed -----------------------------

def test_mesh_needs_enough_devices():
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=8)
    n = len(jax.devices())
    with pytest.raises(ValueError, match=r"tensor_parallel \(%d\).*only %d" % (n + 1, n)):  # before any placement
        Engine(llama, cfg, {}, RuntimeConfig(max_batch_size=2, max_seq_len=32, tensor_parallel=n + 1),
               layout=llama_sharding)


def test_cli_refuses_a_mesh_larger_than_the_machine():
    proc = subprocess.run([sys.executable, "-m", "maxjax.cli", "generate", "hi", "--tensor-parallel", "64",
                           "--data-parallel", "2"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert proc.returncode == 2
    assert "tensor_parallel (64) x data_parallel (2) = 128 devices, but only 1" in proc.stderr


@pytest.mark.parametrize("fields, match", [
    (dict(tensor_parallel=0), "tensor_parallel must be a positive integer"),
    (dict(data_parallel=-2), "data_parallel must be a positive integer"),
    (dict(tensor_parallel=1.5), "tensor_parallel must be a positive integer"),
    (dict(data_parallel=3, max_batch_size=8), r"data_parallel \(3\) must divide max_batch_size \(8\)"),
    (dict(data_parallel=2, max_batch_size=8, batch_buckets=(1, 8)), r"data_parallel \(2\) must divide every "
                                                                      "batch_buckets"),
])
def test_bad_mesh_configs(fields, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**fields)


def test_data_parallel_default_batch_buckets_are_multiples():
    assert RuntimeConfig(max_batch_size=16, data_parallel=4).batch_buckets == (4, 8, 16)
    assert RuntimeConfig(max_batch_size=8).batch_buckets == (1, 2, 4, 8)


@pytest.mark.parametrize("heads, kv_heads, tp", [(9, 3, 2), (9, 3, 4), (32, 8, 16), (8, 4, 8), (9, 3, 3),
                                                  (6, 6, 4)])
def test_head_layout_keeps_every_head_with_its_kv_head(heads, kv_heads, tp):
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=30, num_layers=1,
                            num_heads=heads, num_kv_heads=kv_heads, head_dim=2)
    layout = llama_sharding.head_layout(cfg, tp)
    new_heads, new_kv = len(layout.q_source), len(layout.kv_source)
    assert new_heads % tp == 0 and new_kv % tp == 0 and new_heads % new_kv == 0
    assert sorted(layout.q_source[layout.q_source >= 0].tolist()) == list(range(heads))  # each head once
    group = new_heads // new_kv
    for new_head, source in enumerate(layout.q_source):
        if source >= 0:  # query head h reads original kv head h // (H / KVH) in the rewritten model too
            assert layout.kv_source[new_head // group] == source // (heads // kv_heads)
    assert layout.width % tp == 0 and layout.width >= 30
    assert new_heads < 2 * heads + tp  # padding stays small


def test_rewritten_params_give_the_same_logits_on_one_device():
    """The padded / replicated model (tp 4 layout of 6 heads, 3 kv heads) evaluated without any mesh."""
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=30, num_layers=2, num_heads=6,
                            num_kv_heads=3, head_dim=8, attention_bias=True)
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(1)))
    tp_cfg = llama_sharding.tensor_parallel_config(cfg, 4)
    layers = {k: llama_sharding.to_tensor_parallel(k, v, cfg, 4) for k, v in params["layers"].items()}
    tokens = np.arange(3, 19, dtype=np.int32).reshape(2, 8)
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))

    def logits(c, p):
        forward = jax.jit(lambda p: llama.forward(p, c, tokens, positions, llama.init_kv_cache(c, 2, 8),
                                                  np.arange(2, dtype=np.int32), kv_len=8)[0])
        return np.asarray(forward(p))

    assert (tp_cfg.num_heads, tp_cfg.num_kv_heads, tp_cfg.intermediate_size) == (12, 12, 32)
    np.testing.assert_allclose(logits(tp_cfg, dict(params, layers=layers)), logits(cfg, params), atol=1e-5)


def test_padded_expert_width_leaves_the_output_unchanged():
    """Experts of width 6 at tp 4: zero gate/up columns and zero down rows up to width 8 leave the output as is
    (up to float32 rounding: the padded contraction sums in another order)."""
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=6)
    assert llama_sharding.tensor_parallel_config(cfg, 4).moe_intermediate_size == 8
    rng = np.random.default_rng(0)
    h, router = rng.standard_normal((2, 5, 8), np.float32), rng.standard_normal((8, 4), np.float32)
    experts = {key: rng.standard_normal(shape, np.float32) for key, shape in
               (("e_gate", (4, 8, 6)), ("e_up", (4, 8, 6)), ("e_down", (4, 6, 8)))}
    padded = {key: llama_sharding.to_tensor_parallel(key, value, cfg, 4) for key, value in experts.items()}
    assert padded["e_gate"].shape == (4, 8, 8) and padded["e_down"].shape == (4, 8, 8)
    outputs = [np.asarray(moe.sparse_moe(h, router, *map(jax.numpy.asarray, w.values()), 2, True, jax.nn.silu))
               for w in (experts, padded)]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
