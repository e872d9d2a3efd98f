"""benchmarks/llamacpp_peer.py: the F32 copy holds the same metadata and weights as its GGUF, and the bench's
--llamacpp quick mode runs without llama.cpp installed (no timing asserts: the machine is shared). With
llama.cpp installed, `bench_generate.py --quick --llamacpp` checks that the F32 copy gives maxjax's greedy
tokens (its table says so); that run is not part of the suite (it loads three more models)."""

import json
import runpy
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from llamacpp_peer import f32_copy  # noqa: E402

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
def test_bench_quick_mode_without_llamacpp(tmp_path, smollm2_gguf, monkeypatch):
    """--llamacpp where llama.cpp is not installed: the bench says how to install it and reports the rest."""
    import llamacpp_peer

    monkeypatch.setattr(llamacpp_peer, "llamacpp_available", lambda: False)
    main = runpy.run_path(str(BENCH / "bench_generate.py"))["main"]
    r = main(["--quick", "--model", str(smollm2_gguf), "--no-hf", "--no-start", "--llamacpp",
              "--cache-dir", str(tmp_path), "--json", str(tmp_path / "bench.json")])
    written = json.loads((tmp_path / "bench.json").read_text())
    assert "pip install llama-cpp-python" in written["llamacpp_comparison"]["missing"]
    assert not list(tmp_path.glob("**/*.gguf"))  # nothing written for a peer that cannot run
    (row,) = r["decode"]
    assert row["maxjax_decode_tok_s"] > 0 and r["compiles_during_timed_part"] == 0
