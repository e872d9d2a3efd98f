"""Compiled programs serialized beside the compile cache, so that a warm start loads instead of tracing.

JAX's persistent cache is keyed by the lowered program: finding an entry means tracing and lowering the
model first (most of a warm start). This store is keyed by everything that decides the program *before*
tracing: maxjax's own source, the model and runtime configs, the abstract inputs (shapes, dtypes,
shardings of params and KV cache), the program's kind and shape, jax/jaxlib versions, XLA flags and the
devices. An entry repeats its full key and a SHA-256 of its payload: a stale, foreign or damaged file
is ignored (the program is compiled as before), never loaded as a wrong program.

Trust: an entry holds a native executable and is read back with ``pickle`` (JAX's executable
serialization). The store trusts its directory exactly as JAX's compile cache does (whose entries are
native code too): only this user's maxjax processes must be able to write there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable

from maxjax.kernels import native
from maxjax.kernels.pallas_attention import pallas_backend
from maxjax.runtime.compile_cache import count_program_load

log = logging.getLogger(__name__)

_MAGIC = b"maxjax-program-v1\n"
_JAX_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
              "jax_threefry_partitionable", "jax_use_shardy_partitioner")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of every maxjax source file (Python and native kernels): any edit of the model math or the
    steps changes every key."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc", ".h")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def abstract_signature(tree: Any) -> str:
    """Tree structure and each leaf's shape, dtype and sharding: what a program's inputs look like."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [str(treedef)]
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        parts.append(f"{tuple(leaf.shape)}:{leaf.dtype}:{sharding}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def environment() -> dict[str, Any]:
    """What besides maxjax's inputs changes a compiled program: versions, backend, devices, flags."""
    device = jax.devices()[0]
    return dict(
        jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
        platform_version=device.client.platform_version, device_kind=device.device_kind,
        devices=[d.id for d in jax.devices()], processes=jax.process_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), source=source_digest(), native_kernels=native.enabled(),
        pallas_kernels=pallas_backend(),
        flags={name: str(getattr(jax.config, name, None)) for name in _JAX_FLAGS},
    )


def program_key(**parts: Any) -> str:
    """The full key text of one program (stored in its entry and compared on load)."""
    return json.dumps(dict(parts, environment=environment()), sort_keys=True, default=str)


class ProgramStore:
    """A directory of serialized ``jax.stages.Compiled`` programs, one file per key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + ".program")

    def load(self, key: str) -> jax.stages.Compiled | None:
        """The stored program of ``key``, or None (absent, stale or damaged: the caller compiles)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            program = _decode(data, key)
        except Exception as error:  # a damaged or foreign entry must never stop a start
            log.warning("ignoring the stored program %s (%s: %s); compiling instead", path.name,
                        type(error).__name__, error)
            return None
        count_program_load()
        return program

    def save(self, key: str, program: jax.stages.Compiled) -> None:
        """Writes ``program`` under ``key`` (atomically); a program that cannot be serialized is skipped."""
        try:
            serialized, in_tree, out_tree = serialize_executable.serialize(program)
            payload = pickle.dumps((serialized, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            log.info("not storing a program that cannot be serialized (%s: %s)", type(error).__name__, error)
            return
        header = json.dumps(dict(key=key, sha256=hashlib.sha256(payload).hexdigest())).encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(_MAGIC + header + b"\n" + payload)
        os.replace(tmp, path)


def _decode(data: bytes, key: str) -> jax.stages.Compiled:
    """Checks magic, key and checksum before unpickling anything; raises on any mismatch."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a maxjax program file")
    header, _, payload = data[len(_MAGIC):].partition(b"\n")
    meta = json.loads(header)
    if meta.get("key") != key:
        raise ValueError("its key differs (written for another program)")
    if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
        raise ValueError("checksum mismatch")
    serialized, in_tree, out_tree = pickle.loads(payload)
    return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)


def default_store() -> ProgramStore | None:
    """The store beside JAX's persistent compile cache (``<cache>/programs``), or None when that cache is off."""
    cache_dir = jax.config.jax_compilation_cache_dir
    return ProgramStore(Path(cache_dir) / "programs") if cache_dir else None
