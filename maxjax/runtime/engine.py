"""The device side of text generation: params, the KV cache, token counts and the compiled programs.

The engine knows bucket shapes and packed row arrays, never requests or contexts. Every program is
compiled ahead of time into a table keyed by its shape (``warmup``), or on first use; a shape that the
bucket policy does not produce is an error, not a silent compile. Compiled programs are also serialized
beside the compile cache (``program_store``), so the next process loads them without tracing the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.kernels import native
from maxjax.runtime.compile_cache import cache_hit_count, compile_noting_cache_hit
from maxjax.runtime.config import RuntimeConfig
from maxjax.runtime.kv_pages import PagePool
from maxjax.runtime.lora import LoraSlots
from maxjax.runtime.memory import num_pages_for
from maxjax.runtime.mesh import make_mesh
from maxjax.runtime.precision import jax_dtype, with_matmul_precision
from maxjax.runtime.program_store import abstract_signature, default_store, program_key
from maxjax.runtime.sharded import place_state, program_shardings, put_rows
from maxjax.runtime.sampler import SamplingBatch
from maxjax.runtime.steps import DecodeRows, PrefillRows, decode_step, prefill_step
from maxjax.runtime.verify import VerifyRows, verify_step

log = logging.getLogger(__name__)


def release_free_heap() -> None:
    """Hands the C heap's free memory back to the system (glibc): compiling dozens of programs in parallel leaves
    gigabytes of freed compiler memory in the heap, which an idle server would otherwise keep resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def bitmask_words(vocab_size: int) -> int:
    return math.ceil(vocab_size / 32)


def empty_sampling(num_rows: int, vocab_size: int, max_stop_ids: int) -> dict[str, np.ndarray]:
    """Host arrays of a greedy, unconstrained SamplingBatch (padding rows keep these values)."""
    return dict(
        temperature=np.ones(num_rows, np.float32),
        top_k=np.ones(num_rows, np.int32),
        top_p=np.ones(num_rows, np.float32),
        min_p=np.zeros(num_rows, np.float32),
        repetition_penalty=np.ones(num_rows, np.float32),
        frequency_penalty=np.zeros(num_rows, np.float32),
        presence_penalty=np.zeros(num_rows, np.float32),
        seed=np.zeros(num_rows, np.uint32),
        min_tokens=np.zeros(num_rows, np.int32),
        stop_ids=np.full((num_rows, max_stop_ids), -1, np.int32),
        bitmask=np.full((num_rows, bitmask_words(vocab_size)), 0xFFFFFFFF, np.uint32),
    )


def empty_prefill_rows(num_rows: int, length: int, num_pages: int) -> dict[str, np.ndarray]:
    return dict(
        tokens=np.zeros((num_rows, length), np.int32),
        positions=np.full((num_rows, length), -1, np.int32),
        slots=np.zeros(num_rows, np.int32),
        pages=np.zeros((num_rows, num_pages), np.int32),
        samples=np.zeros(num_rows, bool),
        num_generated=np.zeros(num_rows, np.int32),
        echo_targets=np.full((num_rows, length), -1, np.int32),
        logprobs=np.zeros(num_rows, bool),
        lora_index=np.zeros(num_rows, np.int32),
    )


def place_prefill_row(rows: dict[str, np.ndarray], r: int, tokens: np.ndarray, start: int) -> int:
    """Puts a chunk's ``tokens`` (positions ``start``...) at the end of row ``r``, padding before them, and
    returns the index of its first token. Why: end-aligned rows let attention skip the keys past each query
    block (``attention``'s ``end_aligned``) without knowing where a chunk starts."""
    n = len(tokens)
    offset = rows["tokens"].shape[1] - n
    rows["tokens"][r, offset:] = tokens
    rows["positions"][r, offset:] = np.arange(start, start + n)
    return offset


def check_end_aligned(positions: np.ndarray, kv_len: int) -> None:
    """Every real token t of a prefill chunk of T must sit at a position <= kv_len - T + t (end-aligned rows
    within the span), the promise the prefill program's causal attention relies on."""
    T = positions.shape[1]
    if np.any((positions >= 0) & (positions > kv_len - T + np.arange(T))):
        raise ValueError(f"prefill rows must be end-aligned within the span {kv_len} (place_prefill_row)")


def empty_decode_rows(num_rows: int, num_pages: int) -> dict[str, np.ndarray]:
    return dict(
        tokens=np.zeros(num_rows, np.int32),
        positions=np.zeros(num_rows, np.int32),
        slots=np.zeros(num_rows, np.int32),
        pages=np.zeros((num_rows, num_pages), np.int32),
        steps=np.zeros(num_rows, np.int32),
        num_generated=np.zeros(num_rows, np.int32),
        logprobs=np.zeros(num_rows, bool),
        lora_index=np.zeros(num_rows, np.int32),
    )


def empty_verify_rows(num_rows: int, positions: int, num_pages: int) -> dict[str, np.ndarray]:
    return dict(
        tokens=np.zeros((num_rows, positions), np.int32),
        start=np.zeros(num_rows, np.int32),
        num_drafts=np.zeros(num_rows, np.int32),
        active=np.zeros(num_rows, bool),
        slots=np.zeros(num_rows, np.int32),
        pages=np.zeros((num_rows, num_pages), np.int32),
        num_generated=np.zeros(num_rows, np.int32),
        logprobs=np.zeros(num_rows, bool),
        lora_index=np.zeros(num_rows, np.int32),
    )


class Engine:
    """Owns the device state of one model and runs its prefill/decode programs.

    The KV cache is ``num_pages`` pages of ``config.page_size`` positions; ``pool`` is its host-side bookkeeping
    (``maxjax.runtime.kv_pages``), which the pipelines use to give rows their block tables.

    With ``config.num_devices > 1`` the state lives on a ("data", "model") mesh: ``layout`` is the
    architecture's sharding module (e.g. ``maxjax.architectures.llama_sharding``), which rewrites the params
    for tensor parallelism and names every array's PartitionSpec; see ``maxjax.runtime.sharded``.
    """

    def __init__(self, arch: Any, model_config: Any, params: Any, config: RuntimeConfig, layout: Any = None):
        self.arch = arch
        self.vocab_size = model_config.vocab_size
        self.mesh = make_mesh(config)
        dtype = jax_dtype(config.dtype)
        cache_dtype = jnp.dtype(config.cache_dtype)
        self.num_pages = num_pages_for(config, arch, model_config, params, cache_dtype)
        self.config = config = dataclasses.replace(config, num_pages=self.num_pages)
        if self.mesh is None:
            self.model_config = model_config
            # The serving layout (e.g. fused projections, unstacked layers: see llama.runtime_params).
            self.params = arch.runtime_params(params) if hasattr(arch, "runtime_params") else params
            self.cache = arch.init_kv_cache(model_config, self.num_pages, config.page_size, cache_dtype)
            self.counts = jnp.zeros((config.max_batch_size, self.vocab_size), jnp.int32)  # generated-token counts
            self.state_shardings = None
        else:
            self.model_config, self.params, self.cache, self.counts, self.state_shardings = place_state(
                arch, layout, model_config, params, config, self.mesh, dtype, cache_dtype)
        self.pool = PagePool(self.num_pages, config.page_size, config.prefix_caching)
        self.kv_cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.cache))
        log.info("KV cache: %d pages of %d positions, %.2f GB (max_seq_len %d, prefix caching %s)", self.num_pages,
                 config.page_size, self.kv_cache_bytes / 1e9, config.max_seq_len,
                 "on" if config.prefix_caching else "off")
        self.lora: LoraSlots | None = None  # resident LoRA adapters (max_loras > 0), in every layer's "lora"
        if config.max_loras:
            if not isinstance(self.params.get("layers"), list):
                raise ValueError("LoRA (max_loras > 0) needs an architecture with unstacked runtime layers")
            self.lora = LoraSlots(model_config, set(self.params["layers"][0]), config.max_loras,
                                  config.max_lora_rank, dtype)
            self.params = self.lora.attach(self.params)
        k = config.max_logprobs or 1
        precise = functools.partial(with_matmul_precision, precision=config.matmul_precision)
        self._step_fns = {
            "prefill": precise(functools.partial(prefill_step, arch, self.model_config, k,
                                                 scan_layers=config.scan_prefill_layers)),
            "decode": precise(functools.partial(decode_step, arch, self.model_config, k, config.max_num_steps,
                                                scan_layers=config.scan_decode_layers)),
            # Verify is bound by reading the weights like decode: it follows decode's layer layout.
            "verify": precise(functools.partial(verify_step, arch, self.model_config, k,
                                                scan_layers=config.scan_decode_layers)),
        }
        self._programs: dict[tuple, Any] = {}
        self._copy = None  # the compiled page copy (copy_page)
        # Serialized programs: single-device only (sharded executables are not serialized, see program_store).
        self._store = default_store() if self.mesh is None and jax.process_count() == 1 else None
        self.programs_loaded = 0  # programs this engine took from the store instead of tracing and compiling

    # -- program table -------------------------------------------------------------------------------
    def _example(self, kind: str, shape: tuple[int, ...]):
        sampling = SamplingBatch(**empty_sampling(shape[0], self.vocab_size, self.config.max_stop_ids))
        pages = self.config.pages_per_row(shape[-1])
        if kind == "prefill":
            rows = PrefillRows(**empty_prefill_rows(shape[0], shape[1], pages))
        elif kind == "verify":
            rows = VerifyRows(**empty_verify_rows(shape[0], shape[1], pages))
        else:
            rows = DecodeRows(**empty_decode_rows(shape[0], pages))
        return rows, sampling

    def lower(self, kind: str, shape: tuple[int, ...]) -> jax.stages.Lowered:
        """The ``kind`` (prefill/decode/verify) program of ``shape`` before compilation, to inspect its text."""
        return self._lower(kind, shape)

    def _lower(self, kind: str, shape: tuple[int, ...]):
        rows, sampling = self._example(kind, shape)
        # On a mesh: explicit in/out shardings, so each bucket's program is partitioned once, ahead of time.
        placement = {}
        if self.mesh is not None:
            placement = program_shardings(self.mesh, self.state_shardings, kind, rows, sampling)
            # abstract rows: a multi-process program may not be lowered with host (numpy) arguments
            rows, sampling = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (rows, sampling))
        fn = jax.jit(functools.partial(self._step_fns[kind], kv_len=shape[-1]), donate_argnums=(1, 2), **placement)
        with native.disabled() if self.mesh is not None else contextlib.nullcontext():
            return fn.lower(self.params, self.cache, self.counts, rows, sampling)

    def _rows(self, rows: Any, sampling: Any):
        """Host row arrays as the program's inputs: as they are on one device, split over "data" on a mesh."""
        if self.mesh is None:
            return rows, sampling
        return put_rows(self.mesh, rows), put_rows(self.mesh, sampling)

    def _store_key(self, kind: str, shape: tuple[int, ...]) -> str:
        """Everything that decides the program, known without tracing it (see ``program_store``)."""
        return program_key(kind=kind, shape=shape, arch=self.arch.__name__, model=repr(self.model_config),
                           runtime=repr(dataclasses.replace(self.config, compile_cache_dir=None)),
                           inputs=abstract_signature((self.params, self.cache, self.counts)))

    def _load_stored(self, kind: str, shape: tuple[int, ...]):
        """The stored program of (kind, shape), or None. Safe to call from several threads."""
        return self._store.load(self._store_key(kind, shape)) if self._store else None

    def _add(self, kind: str, shape: tuple[int, ...], program: Any, how: str) -> None:
        """Enters a program in the table (``how``: "stored", "xla-cache" or "compiled"); a freshly compiled one
        is also stored for the next process. One from XLA's cache is not: on the CPU (jax 0.10) such an
        executable, serialized again, misses some of its functions when it is loaded."""
        self._programs[(kind, shape)] = program
        if how == "stored":
            self.programs_loaded += 1
        elif how == "compiled" and self._store:
            self._store.save(self._store_key(kind, shape), program)

    def _compile(self, lowered: Any) -> tuple[Any, str]:
        program, cache_hit = compile_noting_cache_hit(lowered)
        return program, "xla-cache" if cache_hit else "compiled"

    def _program(self, kind: str, shape: tuple[int, ...]):
        key = (kind, shape)
        program = self._programs.get(key)
        if program is None:
            allowed = {"prefill": self.config.prefill_shapes, "decode": self.config.decode_shapes,
                       "verify": self.config.verify_shapes}[kind]()
            if shape not in allowed:
                raise ValueError(f"no {kind} program for shape {shape}: the bucket policy allows {allowed}")
            start, hits = time.perf_counter(), cache_hit_count()
            program, how = self._load_stored(kind, shape), "stored"
            if program is None:
                log.info("compiling the %s program for shape %s (first use of this shape)...", kind, shape)
                program, how = self._compile(self._lower(kind, shape))
            self._add(kind, shape, program, how)
            how = "loaded from the compile cache" if cache_hit_count() > hits else "compiled"
            log.info("%s %s%s in %.1f s", how, kind, shape, time.perf_counter() - start)
        return program

    def compiled_text(self, kind: str, shape: tuple[int, ...]) -> str:
        """The optimized HLO of a program (compiled if needed): what the device runs, for ``hlo_stats``."""
        return self._program(kind, shape).as_text()

    def all_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return ([("prefill", s) for s in self.config.prefill_shapes()]
                + [("decode", s) for s in self.config.decode_shapes()]
                + [("verify", s) for s in self.config.verify_shapes()])

    def warmup(self, workers: int | None = None) -> int:
        """Compiles every program the bucket policy can ask for, in parallel. Returns how many."""
        todo = [(kind, shape) for kind, shape in self.all_shapes() if (kind, shape) not in self._programs]
        with ThreadPoolExecutor(max_workers=workers or max(1, len(todo))) as pool:
            # Loading a stored executable runs outside the GIL: in parallel, as compiling does.
            stored = list(pool.map(lambda kind_shape: self._load_stored(*kind_shape), todo))
            for (kind, shape), program in zip(todo, stored):
                if program is not None:
                    self._add(kind, shape, program, "stored")
            todo = [kind_shape for kind_shape, program in zip(todo, stored) if program is None]
            lowered = [self._lower(kind, shape) for kind, shape in todo]  # tracing holds the GIL: do it serially
            for (kind, shape), (program, how) in zip(todo, pool.map(self._compile, lowered)):
                self._add(kind, shape, program, how)
        self._copy_program()
        release_free_heap()
        return len(self._programs)

    def copy_page(self, source: int, destination: int) -> None:
        """Copies one KV cache page (every layer's keys and values) onto another: a request continuing a kept
        partial page takes its positions this way (``maxjax.runtime.kv_pages``). One small program, compiled by
        ``warmup`` (outside the bucket table: it has one shape)."""
        self._copy_program()
        self.cache = self._copy(self.cache, np.int32(source), np.int32(destination))

    def _copy_program(self) -> None:
        """The page copy: from the program store when a former process stored it, else compiled (and stored)."""
        if self._copy is None:
            def copy(cache, source, destination):
                return jax.tree.map(lambda pages: pages.at[:, destination].set(pages[:, source]), cache)

            self._copy = self._load_stored("copy", ())
            if self._copy is None:
                lowered = jax.jit(copy, donate_argnums=0).lower(self.cache, np.int32(0), np.int32(0))
                self._copy, how = self._compile(lowered)
                if how == "compiled" and self._store:
                    self._store.save(self._store_key("copy", ()), self._copy)

    @property
    def num_programs(self) -> int:
        return len(self._programs)

    # -- LoRA adapters -------------------------------------------------------------------------------
    def require_lora(self) -> LoraSlots:
        if self.lora is None:
            raise ValueError("LoRA is off for this runtime: load with max_loras > 0 (or lora_adapters=...)")
        return self.lora

    def add_lora(self, adapter: Any) -> int:
        """Makes a loaded ``maxjax.weights.lora.LoraAdapter`` servable; returns its slot. Compiles nothing."""
        slot = self.require_lora().add(adapter)
        self.params = self.lora.attach(self.params)
        self.pool.clear_cache()  # cached pages are keyed by adapter name: a name may now mean other weights
        return slot

    def remove_lora(self, name: str) -> None:
        self.require_lora().remove(name)
        self.params = self.lora.attach(self.params)
        self.pool.clear_cache()

    def lora_slot(self, name: str | None) -> int:
        """The slot rows of adapter ``name`` use (0: the base model); ValueError naming an unknown one."""
        if name is None:
            return 0
        return self.require_lora().slot_of(name)

    # -- running -------------------------------------------------------------------------------------
    def prefill(self, rows: dict[str, np.ndarray], sampling: dict[str, np.ndarray], kv_len: int):
        """Runs one prefill program; returns device arrays (first tokens, first LogProbs, echo LogProbs)."""
        shape = (rows["tokens"].shape[0], rows["tokens"].shape[1], kv_len)
        check_end_aligned(rows["positions"], kv_len)
        program = self._program("prefill", shape)
        self.cache, self.counts, first, first_lp, echo_lp = program(
            self.params, self.cache, self.counts, *self._rows(PrefillRows(**rows), SamplingBatch(**sampling)))
        return first, first_lp, echo_lp

    def decode(self, rows: dict[str, np.ndarray], sampling: dict[str, np.ndarray], kv_len: int):
        """Runs one decode program; returns device arrays (tokens [N, B], LogProbs [N, B])."""
        program = self._program("decode", (rows["tokens"].shape[0], kv_len))
        self.cache, self.counts, tokens, lp = program(
            self.params, self.cache, self.counts, *self._rows(DecodeRows(**rows), SamplingBatch(**sampling)))
        return tokens, lp

    def verify(self, rows: dict[str, np.ndarray], sampling: dict[str, np.ndarray], kv_len: int):
        """Runs one speculative verify program; returns device arrays (tokens [B, K + 1], LogProbs [B, K + 1])."""
        program = self._program("verify", rows["tokens"].shape + (kv_len,))
        self.cache, self.counts, tokens, lp = program(
            self.params, self.cache, self.counts, *self._rows(VerifyRows(**rows), SamplingBatch(**sampling)))
        return tokens, lp
