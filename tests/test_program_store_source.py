"""A stored program is never loaded after an edit of maxjax's source: the program store keys every entry by a
digest of the source files (`program_store.source_digest`), so an edited runtime compiles instead of
running a program built from the old code.

Three fresh processes (tests/program_store_worker.py) run one copy of the package over one compile cache:
as copied (compiles and stores), after a one-line edit of one file (must load nothing), and with the
edit undone (loads every program the first start stored).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import maxjax
from maxjax.kernels.native import default_compile_cache_dir

TESTS = Path(__file__).resolve().parent
PACKAGE = Path(maxjax.__file__).resolve().parent
RUN = ("import json, sys; sys.path.insert(0, {tests!r}); import maxjax, program_store_worker as w; "
       "print(json.dumps(dict(w.main({cache!r}), package=maxjax.__file__)))")


def start(src: Path, cache: Path) -> dict:
    # The native kernels stay where this session built them (their digest covers only their own sources).
    env = dict(os.environ, PYTHONPATH=str(src), MAXJAX_COMPILE_CACHE=str(default_compile_cache_dir()))
    out = subprocess.run([sys.executable, "-c", RUN.format(tests=str(TESTS), cache=str(cache))], env=env,
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).resolve().is_relative_to(src)  # the copy ran, not the installed package
    return result


def test_a_source_edit_recompiles_instead_of_loading(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    shutil.copytree(PACKAGE, src / "maxjax", ignore=shutil.ignore_patterns("__pycache__"))
    edited = src / "maxjax" / "runtime" / "steps.py"
    original = edited.read_text()

    cold = start(src, cache)
    assert cold["loaded"] == 0 and cold["programs"] == 3
    edited.write_text(original + "\n# an edit that changes no program\n")
    changed = start(src, cache)
    assert changed["loaded"] == 0 and changed["warmup_traces"] >= changed["programs"]  # traced, not loaded
    assert changed["tokens"] == cold["tokens"]
    edited.write_text(original)
    warm = start(src, cache)
    assert warm["loaded"] == warm["programs"] == 3 and warm["warmup_traces"] == 0  # the first start's entries
    assert warm["tokens"] == cold["tokens"]
