"""The runtime configuration and the one bucket policy every program shape comes from."""

from __future__ import annotations

import dataclasses

from maxjax.kernels.native import default_compile_cache_dir  # noqa: F401  (re-exported)
from maxjax.runtime.precision import resolve_dtype, resolve_matmul_precision


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` up to ``hi``, with ``hi`` itself last when it is not one."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return tuple(out) + (hi,)


def bucket_for(n: int, buckets: tuple[int, ...], what: str) -> int:
    """The smallest bucket >= n. Raises instead of truncating."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Shapes and limits of the compiled programs.

    ``length_buckets`` are attention spans: decode attends over the smallest bucket that holds every row's
    positions, so a short conversation does not read a long cache. Prompts longer than ``max_prefill_len`` are
    prefilled in chunks of that size. Prefill computes every padded token (its cost per token is flat on a
    CPU), so its chunk lengths (``prefill_length_buckets``) are finer than the spans: by default 32 and 64
    below the length buckets, for chat prompts. A chunk shorter than ``max_prefill_len`` attends over its own
    span only (the smallest length bucket that holds it); a chunk that must see further into the cache (the
    tail of a long prompt, the rest of a prompt after a prefix-cache hit) runs alone at the span it needs.
    New prompts are prefilled several rows per call (``prefill_batch_buckets``) when the call holds at most
    ``max_prefill_len`` tokens.
    ``max_batch_size`` (sequences held at once) is 8 here, 32 through ``load_pipeline`` / ``LLM`` /
    ``maxjax serve``; batch buckets are then 1, 4, 8, 16, 32.

    The KV cache is a pool of pages of ``page_size`` positions (``maxjax.runtime.kv_pages``): a sequence holds the
    pages its tokens fill, so memory follows the tokens held, not ``max_seq_len``. The pool has ``num_pages``
    pages, or as many as ``kv_cache_memory`` bytes hold, or by default what ``maxjax.runtime.memory`` gives.
    ``prefix_caching``: full pages are shared between requests whose prompts start with the same tokens.
    """

    max_batch_size: int = 8
    max_seq_len: int = 2048
    max_num_steps: int = 16
    length_buckets: tuple[int, ...] | None = None
    batch_buckets: tuple[int, ...] | None = None
    prefill_batch_buckets: tuple[int, ...] | None = None  # default: (1, 4) up to max_batch_size
    max_prefill_len: int | None = None  # default: the largest length bucket <= 512
    prefill_length_buckets: tuple[int, ...] | None = None  # default: see _default_prefill_lengths
    max_logprobs: int = 20
    max_stop_ids: int = 8
    dtype: str = "float32"  # "auto": bfloat16 on GPU/TPU, float32 on CPU (maxjax.runtime.precision)
    matmul_precision: str | None = None  # None: "highest" for float32, "default" for bfloat16 (see precision.py)
    quantize: str | None = None  # "int8": weight-only int8 linear layers; "gguf": a GGUF file's blocks kept
    scan_decode_layers: bool = False  # True: decode scans its layers (compiles faster, runs ~1.5x slower on CPU)
    scan_prefill_layers: bool = False  # True: prefill scans its layers (compiles faster, copies the weights per call)
    compile_cache_dir: str | None = None
    max_loras: int = 0  # LoRA adapters resident at once (0: LoRA off, the programs carry no adapter math)
    max_lora_rank: int = 16  # adapters of higher rank are refused; lower ranks are zero-padded to this
    tensor_parallel: int = 1  # devices on the mesh's "model" axis (heads, MLP width, vocabulary)
    data_parallel: int = 1  # devices on the mesh's "data" axis (KV cache slots, batch rows)
    speculative: str | None = None  # "ngram" (prompt lookup) or "draft" (a draft model): see pipelines/speculative
    num_speculative_tokens: int = 4  # K: drafts verified per row in one verify program
    page_size: int = 64  # KV cache positions per page
    num_pages: int | None = None  # pages in the KV cache pool (None: from kv_cache_memory or the default budget)
    kv_cache_memory: int | None = None  # bytes of KV cache when num_pages is None (None: runtime/memory.py)
    prefix_caching: bool = True  # share the pages of common prompt prefixes between requests
    kv_cache_dtype: str | None = None  # None: the model's dtype; "bfloat16" / "float8_e4m3fn": 2x / 4x the tokens

    def __post_init__(self):
        for name in ("max_batch_size", "max_seq_len", "max_num_steps", "max_stop_ids", "max_lora_rank",
                     "tensor_parallel", "data_parallel"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("page_size", "num_pages", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative must be None, 'ngram' or 'draft', got {self.speculative!r}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got "
                             f"{self.num_speculative_tokens!r}")
        if self.speculative is not None and self.tensor_parallel * self.data_parallel > 1:
            raise ValueError("speculative: speculative decoding is not served on a mesh yet (tensor_parallel x "
                             "data_parallel must be 1)")
        if not isinstance(self.max_loras, int) or self.max_loras < 0:
            raise ValueError(f"max_loras must be a non-negative integer, got {self.max_loras!r}")
        if not 0 <= self.max_logprobs <= 100:
            raise ValueError(f"max_logprobs must be in [0, 100], got {self.max_logprobs}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))
        object.__setattr__(self, "matmul_precision", resolve_matmul_precision(self.matmul_precision, self.dtype))
        if self.quantize not in (None, "int8", "gguf"):
            raise ValueError(f"quantize must be None, 'int8' or 'gguf', got {self.quantize!r}")
        defaults = self.length_buckets is None
        if defaults:
            object.__setattr__(self, "length_buckets", _default_length_buckets(self.max_seq_len))
        if self.batch_buckets is None:
            object.__setattr__(self, "batch_buckets", _default_batch_buckets(self.max_batch_size, self.data_parallel))
        _check_buckets("length_buckets", self.length_buckets, self.max_seq_len)
        _check_buckets("batch_buckets", self.batch_buckets, self.max_batch_size)
        if self.prefill_batch_buckets is None:
            object.__setattr__(self, "prefill_batch_buckets", tuple(b for b in (1, 4) if b <= self.max_batch_size))
        _check_buckets("prefill_batch_buckets", self.prefill_batch_buckets, self.max_batch_size, exact_top=False)
        _check_data_parallel(self)
        if self.max_loras and self.num_devices > 1:
            raise ValueError("max_loras: LoRA adapters are not served on a mesh yet (tensor_parallel x "
                             "data_parallel must be 1)")
        if self.max_prefill_len is None:
            fitting = [b for b in self.length_buckets if b <= 512]
            object.__setattr__(self, "max_prefill_len", fitting[-1] if fitting else self.length_buckets[0])
        if self.max_prefill_len not in self.length_buckets:
            raise ValueError(f"max_prefill_len ({self.max_prefill_len}) must be one of length_buckets "
                             f"{self.length_buckets}")
        if self.prefill_length_buckets is None:
            object.__setattr__(self, "prefill_length_buckets", _default_prefill_lengths(self, defaults))
        _check_buckets("prefill_length_buckets", self.prefill_length_buckets, self.max_prefill_len)
        missing = [b for b in self.length_buckets if b <= self.max_prefill_len and b not in self.prefill_length_buckets]
        if missing:
            raise ValueError(f"prefill_length_buckets {self.prefill_length_buckets} must hold every length bucket up "
                             f"to max_prefill_len ({self.max_prefill_len}); missing {missing}")

    @property
    def num_devices(self) -> int:
        """Devices on the mesh (tensor_parallel x data_parallel); 1 means no mesh at all."""
        return self.tensor_parallel * self.data_parallel

    @property
    def cache_dtype(self) -> str:
        """The KV cache's dtype name: ``kv_cache_dtype``, else the model's."""
        return self.kv_cache_dtype or self.dtype

    def pages_per_row(self, span: int) -> int:
        """Block table width of a program attending over ``span`` positions."""
        return -(-span // self.page_size)

    @property
    def prefill_lengths(self) -> tuple[int, ...]:
        return self.prefill_length_buckets

    def span_of(self, length: int) -> int:
        """The attention span of a prefill chunk of ``length`` tokens that starts at position 0."""
        return bucket_for(length, self.length_buckets, "prefill chunk length")

    def decode_shapes(self) -> list[tuple[int, int]]:
        """Every (batch, attention span) a decode program is compiled for."""
        return [(b, s) for b in self.batch_buckets for s in self.length_buckets]

    def verify_shapes(self) -> list[tuple[int, int, int]]:
        """Every (batch, 1 + num_speculative_tokens, attention span) a verify program is compiled for."""
        if self.speculative is None:
            return []
        return [(b, 1 + self.num_speculative_tokens, s) for b in self.batch_buckets for s in self.length_buckets]

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        """Every (batch, chunk length, attention span) a prefill program is compiled for: every chunk length at
        every span that holds it for one row (a short chunk deep in the cache, e.g. the rest of a prompt after a
        prefix-cache hit or the tail of a long prompt, computes only its own tokens); more rows than the smallest
        batch bucket only at a chunk's own span and up to ``max_prefill_len`` tokens."""
        return [(b, t, s) for b in self.prefill_batch_buckets for t in self.prefill_lengths
                for s in self.length_buckets
                if (b == self.prefill_batch_buckets[0] and s >= self.span_of(t))
                or (b * t <= self.max_prefill_len and s == self.span_of(t))]

    def prefill_shape(self, num_tokens: int, end: int) -> tuple[int, int]:
        """(chunk length, span) of the program that prefills ``num_tokens`` tokens ending at position ``end - 1``."""
        span = bucket_for(end, self.length_buckets, "sequence length")
        return next(t for t in self.prefill_lengths if t >= num_tokens), span

    def prefill_rows_per_call(self, length: int, span: int) -> tuple[int, ...]:
        """The batch buckets a prefill call of this (chunk length, span) may use."""
        return tuple(b for b in self.prefill_batch_buckets if (b, length, span) in self.prefill_shapes())


KV_CACHE_DTYPES = (None, "float32", "bfloat16", "float8_e4m3fn")


def _default_length_buckets(max_seq_len: int) -> tuple[int, ...]:
    """128, 512, 2048, ... (powers of four keep the program count small), capped by max_seq_len."""
    out, n = [], 128
    while n < max_seq_len:
        out.append(n)
        n *= 4
    return tuple(out) + (max_seq_len,)


def _default_batch_buckets(max_batch_size: int, data_parallel: int) -> tuple[int, ...]:
    """Powers of two up to max_batch_size, multiples of data_parallel (decode rows are split over "data").
    Above 8 slots the 2-row bucket is left out: a CPU decode step of 1-4 rows is bound by reading the weights,
    so 2 rows lose little in the 4-row program, and each bucket costs a compile per span (cold warm-up)."""
    buckets = powers_of_two(min(data_parallel, max_batch_size), max_batch_size)
    if max_batch_size > 8 and data_parallel == 1:
        buckets = tuple(b for b in buckets if b != 2)
    return buckets


def _default_prefill_lengths(config: RuntimeConfig, default_spans: bool) -> tuple[int, ...]:
    """The length buckets up to max_prefill_len; with the default spans also 32 and 64, which fit chat prompts
    (a 30-token prompt padded to 128 computes 4x its tokens)."""
    lengths = {b for b in config.length_buckets if b <= config.max_prefill_len}
    if default_spans:
        lengths |= {b for b in (32, 64) if b < config.max_prefill_len}
    return tuple(sorted(lengths))


def _check_data_parallel(config: RuntimeConfig) -> None:
    """KV cache slots and decode rows are split evenly over the "data" axis."""
    dp = config.data_parallel
    if config.max_batch_size % dp:
        raise ValueError(f"data_parallel ({dp}) must divide max_batch_size ({config.max_batch_size})")
    uneven = [b for b in config.batch_buckets if b % dp]
    if uneven:
        raise ValueError(f"data_parallel ({dp}) must divide every batch_buckets entry, got {config.batch_buckets}")


def _check_buckets(name: str, buckets: tuple[int, ...], top: int, exact_top: bool = True) -> None:
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
        raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {buckets!r}")
    if list(buckets) != sorted(set(buckets)):
        raise ValueError(f"{name} must be strictly increasing, got {buckets!r}")
    if exact_top and buckets[-1] != top:
        raise ValueError(f"the largest of {name} must equal {top}, got {buckets!r}")
    if buckets[-1] > top:
        raise ValueError(f"{name} {buckets!r} exceed the limit {top}")
