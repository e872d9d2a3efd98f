"""benchmarks/llamacpp_peer.py: the F32 copy holds the same metadata and weights as its GGUF, and the bench's
--llamacpp quick mode runs with or without llama.cpp installed (no timing asserts: the machine is shared)."""

import json
import runpy
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from llamacpp_peer import f32_copy, llamacpp_available  # noqa: E402

Q = gguf.GGMLQuantizationType


def test_f32_copy_keeps_metadata_and_dequantizes_every_tensor(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "m.Q4_1.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 1e5)
    writer.add_token_list(["<a>", "b", "c"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    weights = {"a.weight": (Q.Q4_1, rng.normal(size=(8, 64))), "b.weight": (Q.Q8_0, rng.normal(size=(4, 64))),
               "norm.weight": (Q.F32, rng.normal(size=64))}
    for name, (kind, w) in weights.items():
        w = w.astype(np.float32)
        writer.add_tensor(name, w if kind == Q.F32 else gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    copy = f32_copy(source, tmp_path / "cache")
    assert f32_copy(source, tmp_path / "cache") == copy  # written once, then reused
    original, f32 = gguf.GGUFReader(source), gguf.GGUFReader(copy)
    assert f32.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    for name, field in original.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert f32.fields[name].contents() == field.contents(), name
    tensors = {t.name: t for t in f32.tensors}
    assert len(tensors) == len(original.tensors)
    for tensor in original.tensors:
        ours = tensors[tensor.name]
        assert ours.tensor_type == Q.F32 and list(ours.shape) == list(tensor.shape)
        np.testing.assert_array_equal(ours.data, gguf.quants.dequantize(tensor.data, tensor.tensor_type))


@pytest.mark.slow
def test_bench_llamacpp_quick(tmp_path, smollm2_gguf):
    main = runpy.run_path(str(BENCH / "bench_generate.py"))["main"]
    r = main(["--quick", "--model", str(smollm2_gguf), "--no-hf", "--no-start", "--llamacpp",
              "--cache-dir", str(tmp_path), "--json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text())["llamacpp_comparison"] == json.loads(
        json.dumps(r["llamacpp_comparison"]))
    peer = r["llamacpp_comparison"]
    if not llamacpp_available():
        assert "pip install llama-cpp-python" in peer["missing"]
        return
    assert len(peer["rows"]) == 4
    for figures in peer["rows"].values():
        assert all(rate > 0 for rate in figures["decode_tok_s"].values()) and figures["ttft_s"] > 0
    # The F32 copy holds maxjax's float32 weights: the same greedy tokens.
    assert peer["llamacpp"]["f32"]["greedy_same_tokens_as_maxjax"] == 1.0
    assert peer["llamacpp"]["f32"]["file_bytes"] > 4 * peer["llamacpp"]["q4"]["file_bytes"]
