"""Native CPU kernels: the C++ sources next to this file, built into one library with the system C++ compiler on
first use and called from compiled programs through the XLA FFI (``jax.ffi.ffi_call``). One library, so that
every kernel shares one set of worker threads (``workers.h``).

Why build on the user's machine: the kernels are compiled with ``-march=native`` for the CPU they run on, and a
wheel stays pure Python. The shared library is cached in the compile cache directory (``native/``), keyed by the
source, the compiler, jax and the CPU, so a later process only loads it. Without a compiler (or with
``MAXJAX_NATIVE_KERNELS=0``) ``ffi_target`` answers None and callers keep XLA's own ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import jax


log = logging.getLogger(__name__)

ENABLE_ENV = "MAXJAX_NATIVE_KERNELS"
_SOURCES = Path(__file__).resolve().parent


_this_thread = threading.local()


def enabled() -> bool:
    """Native kernels are used unless ``MAXJAX_NATIVE_KERNELS=0`` (read on every call, so a benchmark can
    load one model with them and one without in the same process) or inside `disabled`."""
    if getattr(_this_thread, "disabled", False):
        return False
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def disabled():
    """No native kernel in what is traced inside (this thread): for programs partitioned over several devices,
    whose partitioner cannot split a custom call (it would gather the operands onto every device)."""
    before = getattr(_this_thread, "disabled", False)
    _this_thread.disabled = True
    try:
        yield
    finally:
        _this_thread.disabled = before


def default_compile_cache_dir() -> Path:
    env = os.environ.get("MAXJAX_COMPILE_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "compile_cache"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build(compiler: str) -> Path:
    sources = sorted(_SOURCES.glob("*.cc"))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in sorted(_SOURCES.glob("*.[ch]*"))]
    digest = hashlib.sha256("\0".join(texts + [version, jax.__version__, _cpu_identity()]).encode()).hexdigest()
    library = default_compile_cache_dir() / "native" / f"maxjax_kernels-{digest[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
               "-I", jax.ffi.include_dir(), *map(str, sources), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)  # atomic: a concurrent process sees no half-written library
    return library


# Every kernel of the library: FFI target name -> exported symbol. All are registered when the library loads,
# so that a program deserialized by a warm start (``program_store``) finds every target it calls, traced or not.
KERNELS = {
    "maxjax_panel_matmul": "MaxjaxPanelMatmul",
    "maxjax_decode_attention": "MaxjaxDecodeAttention",
    "maxjax_chunk_attention": "MaxjaxChunkAttention",
    "maxjax_cache_write": "MaxjaxCacheWrite",
    "maxjax_q4_matmul": "MaxjaxQ4Matmul",
    "maxjax_q8_matmul": "MaxjaxQ8Matmul",
    "maxjax_argmax": "MaxjaxArgmax",
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler found: native kernels unavailable, XLA ops are used instead")
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("native kernels unavailable, XLA ops are used instead: %s", err)
        return None
    for target, symbol in KERNELS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def ffi_target(target: str) -> str | None:
    """``target`` (a key of `KERNELS`) when the native kernels can serve this process, building and registering
    the library once per process (and building it once per machine: see the module docstring); None on a
    non-CPU backend, when disabled, or when it cannot be built."""
    if jax.default_backend() != "cpu" or not enabled() or _library() is None:
        return None
    return target
