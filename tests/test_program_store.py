"""Serialized programs (maxjax.runtime.program_store): a warm process loads instead of tracing, gives the same
tokens, and anything stale or damaged is compiled again instead of loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("program_store_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def start(cache_dir: Path, *args: str) -> dict:
    """One fresh process start over ``cache_dir`` (see program_store_worker.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(WORKER), str(cache_dir), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_process_loads_every_program_without_tracing(tmp_path):
    cold = start(tmp_path)
    assert cold["loaded"] == 0 and cold["warmup_traces"] >= cold["programs"] == 3
    assert len(list((tmp_path / "programs").glob("*.program"))) == cold["programs"] + 1  # + the page copy
    warm = start(tmp_path)
    assert warm["loaded"] == warm["programs"] == 3
    assert warm["warmup_traces"] == 0 and warm["traces"] == 0  # nothing traced: not warm-up, not generation
    assert warm["tokens"] == cold["tokens"] and len(cold["tokens"]) == 8
    changed = start(tmp_path, "8")  # another max_num_steps: other keys, nothing may load
    assert changed["loaded"] == 0 and changed["warmup_traces"] >= 3
    assert changed["tokens"] == cold["tokens"]
    # Its 2 decode programs were compiled and stored; its prefill program and page copy (the same HLO) came from
    # XLA's cache and are not stored (re-serialized, such an executable can miss functions when loaded on the CPU).
    assert len(list((tmp_path / "programs").glob("*.program"))) == 3 + 1 + 2


def test_stale_foreign_or_damaged_entries_are_ignored(tmp_path):
    """In a fresh process (program_store_worker.py --entries): after other compilations in one process, XLA CPU
    can serialize an executable without kernels it shares with them, and the loaded copy then fails to run."""
    assert start(tmp_path, "--entries") == {"entries": "ok"}
