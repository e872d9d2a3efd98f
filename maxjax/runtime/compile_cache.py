"""The persistent XLA compilation cache and a counter of compilations.

The counter listens to JAX's backend-compile event, which fires once for every executable JAX obtains
(a fresh compile or a persistent-cache load): after ``warmup()`` it must stay at zero. A program loaded
from maxjax's own serialized programs (``program_store``) counts as a cache hit too; ``trace_count`` counts
JAX's traces of Python functions (what a warm start from that store avoids).
"""

from __future__ import annotations

import threading
from pathlib import Path

import jax
from jax import monitoring

from maxjax.runtime.config import default_compile_cache_dir

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_lock = threading.Lock()
_compiles = 0
_cache_hits = 0
_traces = 0
_listening = False
_this_thread = threading.local()


def _on_duration(event: str, duration: float, **_) -> None:
    global _compiles, _traces
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _compiles += 1
    elif event == _TRACE_EVENT:
        with _lock:
            _traces += 1


def _on_event(event: str, **_) -> None:
    global _cache_hits
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _cache_hits += 1
        _this_thread.hits = getattr(_this_thread, "hits", 0) + 1  # the event fires in the compiling thread


def compile_count() -> int:
    """How many executables JAX has compiled (or loaded from the persistent cache) in this process so far,
    counted from the first call of this function or of ``enable_compile_cache``."""
    global _listening
    with _lock:
        if not _listening:
            monitoring.register_event_duration_secs_listener(_on_duration)
            monitoring.register_event_listener(_on_event)
            _listening = True
        return _compiles


def cache_hit_count() -> int:
    """How many of ``compile_count()``'s executables were loaded from the persistent cache, not compiled."""
    compile_count()
    with _lock:
        return _cache_hits


def compile_noting_cache_hit(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """Compiles ``lowered``; also says whether the executable came from the persistent cache (thread-safe)."""
    compile_count()
    before = getattr(_this_thread, "hits", 0)
    compiled = lowered.compile()
    return compiled, getattr(_this_thread, "hits", 0) > before


def trace_count() -> int:
    """How many Python functions JAX has traced to jaxprs in this process (counted as ``compile_count``)."""
    compile_count()
    with _lock:
        return _traces


def count_program_load() -> None:
    """Records a program loaded from maxjax's serialized programs: an executable obtained from a cache."""
    global _compiles, _cache_hits
    compile_count()
    with _lock:
        _compiles += 1
        _cache_hits += 1


def enable_compile_cache(path: str | Path | None = None) -> Path:
    """Points JAX's persistent compilation cache at ``path`` (default: ``MAXJAX_COMPILE_CACHE`` or the repo's
    ``compile_cache/``). Every program is cached, however fast it compiled: the default thresholds silently
    skip small programs."""
    path = Path(path) if path is not None else default_compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compile_count()
    return path
