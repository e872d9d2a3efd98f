"""benchmarks/bench_generate.py in its reduced mode: it runs end to end and reports sane, complete figures
(no timing asserts: the machine is shared)."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


@pytest.fixture
def hf_peer_is_the_session_reference(monkeypatch, smollm2_gguf, hf_smollm2):
    """The bench's transformers peer loads exactly what tests/conftest.py's ``hf_smollm2`` loaded (the GGUF in
    float32, 15-20 s here): that load returns the session's model; any other load runs as usual."""
    import torch
    import transformers

    load = transformers.AutoModelForCausalLM.from_pretrained
    same = (str(smollm2_gguf.parent), smollm2_gguf.name, torch.float32)

    def from_pretrained(folder, *args, **kwargs):
        if not args and (str(folder), kwargs.get("gguf_file"), kwargs.get("dtype")) == same:
            return hf_smollm2
        return load(folder, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)


@pytest.mark.slow
@pytest.mark.usefixtures("hf_peer_is_the_session_reference")
def test_bench_generate_quick(tmp_path, smollm2_gguf):
    out = tmp_path / "bench.json"
    main = runpy.run_path(str(SCRIPT))["main"]
    main(["--quick", "--model", str(smollm2_gguf), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["compiles_during_timed_part"] == 0
    (row,) = r["decode"]
    assert row["batch"] == 1 and row["maxjax_decode_tok_s"] > 0 and row["hf_decode_tok_s"] > 0
    assert row["greedy_same_tokens"] == 1.0  # same weights, same greedy tokens as transformers
    assert r["ttft"]["maxjax_s"] > 0 and r["ttft"]["hf_s"] > 0
    assert r["bandwidth"]["read_GB_s"] > 0 and 0 < r["bandwidth"]["maxjax_fraction"]
    assert 0 < r["host_overhead"]["wall_ms_per_step"]
    # SmolLM2-135M in float32: ~135M parameters of 4 bytes each.
    assert 4.5e8 < r["weight_bytes_per_token"] < 6e8
    for start in ("cold", "warm"):
        assert r["start"][start]["programs"] == 2 and r["start"][start]["start_to_first_output_s"] > 0
    for start in ("lazy_cold", "lazy_warm"):
        assert r["start"][start]["programs"] == 0 and r["start"][start]["start_to_first_output_s"] > 0


@pytest.mark.slow  # HF transformers is the peer
def test_bench_generate_random_shape_quick(tmp_path):
    """--random-shape writes a random-weight HF folder once (reused by a second run), runs maxjax and HF on it
    and reports every figure, including the device operations per decode step from the compiled program."""
    out = tmp_path / "bench.json"
    main = runpy.run_path(str(SCRIPT))["main"]
    args = ["--random-shape", "llama-8b", "--quick", "--no-start", "--cache-dir", str(tmp_path / "cache")]
    r = main(args + ["--json", str(out)])
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    written = (folder / "done").stat().st_mtime
    assert json.loads(out.read_text())["decode"] == r["decode"]
    (row,) = r["decode"]
    assert row["maxjax_decode_tok_s"] > 0 and row["hf_decode_tok_s"] > 0
    assert row["greedy_same_tokens"] == 1.0  # same random weights, same greedy tokens
    assert r["compiles_during_timed_part"] == 0 and r["maxjax_load_s"] > 0 and r["hf_load_s"] > 0
    assert r["bandwidth"]["read_GB_s"] > 0 and r["bandwidth"]["maxjax_fraction"] > 0
    ops = r["decode_step_ops"]
    assert ops["by_opcode"].get("dot", 0) + ops["by_opcode"].get("fusion", 0) > 0
    assert 0 < ops["greedy"] <= ops["sampling_and_logprobs"]
    assert ops["moved_MB"] > 0 and ops["weight_copy_MB"] > 0  # --quick scans the layers: weights are copied
    main(args + ["--batch-sizes", "1", "--no-hf"])  # the second run reuses the folder
    assert (folder / "done").stat().st_mtime == written


@pytest.mark.slow  # HF transformers is the peer
@pytest.mark.usefixtures("hf_peer_is_the_session_reference")
def test_bench_generate_end_to_end_quick(tmp_path, smollm2_gguf):
    """--end-to-end: batch 2 through one KV slot (the second request queues), both systems, every figure."""
    out = tmp_path / "e2e.json"
    main = runpy.run_path(str(SCRIPT))["main"]
    main(["--end-to-end", "--quick", "--no-start", "--model", str(smollm2_gguf), "--json", str(out)])
    r = json.loads(out.read_text())
    assert [row["batch"] for row in r["end_to_end"]] == [1, 2] and r["compiles_during_timed_part"] == 0
    for row in r["end_to_end"]:
        assert row["maxjax_e2e_tok_s"] > 0 and row["hf_e2e_tok_s"] > 0 and row["e2e_ratio"] > 0
    assert r["end_to_end"][0]["greedy_same_tokens"] == 1.0
    assert r["ttft"]["maxjax_s"] > 0 and r["ttft"]["hf_s"] > 0
    assert r["programs_used"] == 2  # one prefill and one decode shape in the quick runtime


def test_bench_quantized_matmul_quick():
    """The kept-GGUF product forms of bench_quantized.py agree with the float32 dot (checked inside) and are timed."""
    from maxjax.architectures import block_panels

    main = runpy.run_path(str(SCRIPT.with_name("bench_quantized.py")))["main"]
    rows = main(["--matmul", "--quick"])
    assert [(r["shape"].split()[-1], r["batch"]) for r in rows] == [("Q4_1", 1), ("Q4_1", 8), ("Q8_0", 1), ("Q8_0", 8)]
    forms = {"float32 dot", "block_matmul", "dequantize + dot"} | ({"native kernel"} if block_panels.native.ffi_target(block_panels.Q4_TARGET) else set())
    for r in rows:
        assert set(r["times"]) == forms
        assert all(wall > 0 for wall, _ in r["times"].values())
