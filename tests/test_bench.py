"""benchmarks/bench_generate.py in its reduced mode: it runs end to end and reports sane, complete figures
(no timing asserts: the machine is shared)."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


@pytest.mark.slow
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
