"""Native CPU kernels: C++ sources next to this file, built with the system C++ compiler on first use into one
shared library (one pool of worker threads for every kernel, ``workers.h``) and called from compiled programs
through the XLA FFI (``jax.ffi.ffi_call``).

Why build on the user's machine: the kernels are compiled with ``-march=native`` for the CPU they run on, and a
wheel stays pure Python. The shared library is cached in the compile cache directory (``native/``), keyed by the
sources, the compiler, jax and the CPU, so a later process only loads it. Without a compiler (or with
``MAXJAX_NATIVE_KERNELS=0``) ``ffi_target`` answers None and callers keep XLA's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax

from maxjax.runtime.config import default_compile_cache_dir

log = logging.getLogger(__name__)

ENABLE_ENV = "MAXJAX_NATIVE_KERNELS"
_SOURCES = Path(__file__).resolve().parent


def enabled() -> bool:
    """Native kernels are used unless ``MAXJAX_NATIVE_KERNELS=0`` (read on every call, so a benchmark can
    load one model with them and one without in the same process)."""
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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
    texts = [path.read_text() for path in [*sources, *sorted(_SOURCES.glob("*.h"))]]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join(
        [*texts, version, jax.__version__, _cpu_identity()]).encode()).hexdigest()[:16]
    library = default_compile_cache_dir() / "native" / f"maxjax_native-{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
               "-I", jax.ffi.include_dir(), *map(str, sources), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)  # atomic: a concurrent process sees no half-written library
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler found: native kernels unavailable, XLA ops are used instead")
        return None
    try:
        return ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("native kernels unavailable, XLA ops are used instead: %s", err)
        return None


@functools.cache
def _register(symbol: str, target: str) -> str | None:
    library = _library()
    if library is None:
        return None
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return target


def available() -> bool:
    """Whether the native kernels run here: the CPU backend, not disabled, and the library built (or cached)."""
    return jax.default_backend() == "cpu" and enabled() and _library() is not None


def ffi_target(symbol: str, target: str) -> str | None:
    """The registered FFI target name of kernel ``symbol`` of the native library, building the library once per
    process (and once per machine: see the module docstring); None on a non-CPU backend, when disabled, or when
    it cannot be built."""
    if jax.default_backend() != "cpu" or not enabled():
        return None
    return _register(symbol, target)
