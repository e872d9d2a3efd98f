"""`load_pipeline`: the MAX registry pattern, a model and a task in, (tokenizer, pipeline) out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maxjax.interfaces import PipelineTask


def load_text_pipeline(model: str | Path | None = None, *, warmup: bool = False,
                       **runtime: Any) -> tuple[Any, "TextGenerationPipeline"]:
    """Tokenizer and TokenGenerator for a Llama-family model (see ``maxjax.load_model`` for ``model``).

    ``runtime`` holds ``RuntimeConfig`` fields (``max_batch_size``, ``max_seq_len``, ``dtype``, ...).
    Programs compile on first use (and land in the persistent compile cache); ``warmup=True`` compiles all
    of them now, after which no request mix compiles anything.
    """
    import dataclasses

    from maxjax.architectures import llama, llama_sharding
    from maxjax.models import load_model
    from maxjax.pipelines.text import TextGenerationPipeline
    from maxjax.runtime.compile_cache import enable_compile_cache
    from maxjax.runtime.config import RuntimeConfig
    from maxjax.runtime.engine import Engine
    from maxjax.runtime.mesh import make_mesh
    from maxjax.weights import load_weights

    unknown = sorted(set(runtime) - {f.name for f in dataclasses.fields(RuntimeConfig)})
    if unknown:
        raise ValueError(f"unknown runtime config field(s) {unknown}; see maxjax.runtime.config.RuntimeConfig")
    config = RuntimeConfig(**runtime)
    enable_compile_cache(config.compile_cache_dir)
    mesh = make_mesh(config)
    if mesh is None:
        loaded = load_model(model, dtype=config.dtype, quantize=config.quantize)
    else:  # tensor by tensor: the engine places each device's slice straight onto it
        loaded = load_weights(model, config.dtype, lazy=True,
                              store_shardings=lambda cfg: llama_sharding.restore_shardings(cfg, mesh))
    if config.max_seq_len > loaded.config.max_position_embeddings:
        raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context length "
                         f"{loaded.config.max_position_embeddings}")
    tokenizer = loaded.tokenizer
    tokenizer.max_length = min(tokenizer.max_length, config.max_seq_len)
    pipeline = TextGenerationPipeline(Engine(llama, loaded.config, loaded.params, config,
                                               layout=llama_sharding), tokenizer, loaded.name)
    if warmup:
        pipeline.warmup()
    return tokenizer, pipeline


def load_pipeline(model: str | Path | None = None, task: PipelineTask | str = PipelineTask.TEXT_GENERATION,
                  **config: Any) -> tuple[Any, Any]:
    """(tokenizer, pipeline) for ``task``: a TokenGenerator, an EmbeddingsGenerator or an AudioGenerator."""
    try:
        task = PipelineTask(task)
    except ValueError:
        raise ValueError(f"task must be one of {[t.value for t in PipelineTask]}, got {task!r}") from None
    if task is PipelineTask.TEXT_GENERATION:
        return load_text_pipeline(model, **config)
    if task is PipelineTask.EMBEDDINGS_GENERATION:
        from maxjax.pipelines.embeddings import load_embeddings_pipeline

        return load_embeddings_pipeline(model, **config)
    from maxjax.pipelines.audio import load_audio_pipeline

    return load_audio_pipeline(model, task=task, **config)
