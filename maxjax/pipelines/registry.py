"""`load_pipeline`: the MAX registry pattern, a model and a task in, (tokenizer, pipeline) out."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maxjax.interfaces import PipelineTask


def read_lora_adapters(lora_adapters: Mapping[str, str | Path] | None, model_config: Any) -> list[Any]:
    """``{name: PEFT adapter folder}`` -> loaded ``LoraAdapter``s, checked against the model's shapes."""
    if not lora_adapters:
        return []
    if not isinstance(lora_adapters, Mapping):
        raise ValueError(f"lora_adapters must be a dict of name -> adapter folder, got {type(lora_adapters).__name__}")
    from maxjax.context import check_lora_name
    from maxjax.weights.lora import load_lora_adapter

    return [load_lora_adapter(path, model_config, check_lora_name(name, field="lora_adapters name"))
            for name, path in lora_adapters.items()]


def size_for_lora(config: Any, adapters: list[Any], runtime: dict[str, Any]) -> Any:
    """``config`` with room for ``adapters`` where the caller left ``max_loras`` / ``max_lora_rank`` unset."""
    import dataclasses

    if not adapters:
        return config
    changes = {}
    if "max_loras" not in runtime:
        changes["max_loras"] = len(adapters)
    if "max_lora_rank" not in runtime:
        changes["max_lora_rank"] = max([config.max_lora_rank] + [a.rank for a in adapters])
    return dataclasses.replace(config, **changes)


def serve_lora_adapters(pipeline: Any, tokenizer: Any, adapters: list[Any]) -> None:
    """Makes ``adapters`` resident on the pipeline's engine and lets the tokenizer check request names."""
    for adapter in adapters:
        pipeline.engine.add_lora(adapter)
    tokenizer.lora_adapters = pipeline.engine.lora


def load_text_pipeline(model: str | Path | None = None, *, warmup: bool = False, progress: bool = False,
                       lora_adapters: Mapping[str, str | Path] | None = None,
                       draft_model: str | Path | None = None, **runtime: Any) -> tuple[Any, "TextGenerationPipeline"]:
    """Tokenizer and TokenGenerator for a Llama-family model (see ``maxjax.load_model`` for ``model``).

    ``runtime`` holds ``RuntimeConfig`` fields (``max_batch_size``, ``max_seq_len``, ``dtype``, ...).
    Programs compile on first use (and land in the persistent compile cache); ``warmup=True`` compiles all
    of them now, after which no request mix compiles anything. ``progress=True`` shows a line per phase
    (weights, KV cache, adapters, warm-up and its program count) and a bar while the weights are read.
    ``lora_adapters`` ({name: PEFT folder}) are loaded and servable by ``lora_name``; ``max_loras`` /
    ``max_lora_rank`` default to fit them. ``draft_model`` (with ``speculative="draft"``) is the speculative draft
    model, anything ``load_model`` takes, same vocabulary.
    """
    import dataclasses

    from maxjax.architectures import llama, llama_sharding
    from maxjax.models import load_model
    from maxjax.pipelines.text import TextGenerationPipeline
    from maxjax.runtime.compile_cache import enable_compile_cache
    from maxjax.runtime.config import RuntimeConfig
    from maxjax.runtime.engine import Engine
    from maxjax.runtime.memory import MAX_DEFAULT_SLOTS
    from maxjax.runtime.mesh import make_mesh
    from maxjax.runtime.sharded import restore_shardings
    from maxjax.weights import load_weights

    from maxjax.progress import Phases

    unknown = sorted(set(runtime) - {f.name for f in dataclasses.fields(RuntimeConfig)})
    if unknown:
        raise ValueError(f"unknown runtime config field(s) {unknown}; see maxjax.runtime.config.RuntimeConfig")
    config = RuntimeConfig(**runtime)
    phases = Phases(progress)
    if (draft_model is None) != (config.speculative != "draft"):  # checked before any weights are read
        raise ValueError(f"draft_model is needed with speculative='draft' and only then (speculative="
                         f"{config.speculative!r}, draft_model={draft_model!r})")
    enable_compile_cache(config.compile_cache_dir)
    mesh = make_mesh(config)
    if mesh is None:
        loaded = load_model(model, dtype=config.dtype, quantize=config.quantize,
                            matmul_precision=config.matmul_precision, progress=progress)
    else:  # tensor by tensor: the engine places each device's slice straight onto it
        phases("reading the weights of %s onto a %s mesh", model if model is not None else "smollm2",
               dict(mesh.shape))
        loaded = load_weights(model, config.dtype, lazy=True, progress=progress,
                              store_shardings=lambda cfg: restore_shardings(llama, llama_sharding, cfg, mesh))
    if "max_seq_len" in runtime and config.max_seq_len > loaded.config.max_position_embeddings:
        raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context length "
                         f"{loaded.config.max_position_embeddings}")
    defaults = {}  # sequences at once, and the model's own context length (pages hold only what is used)
    if "max_batch_size" not in runtime:
        defaults["max_batch_size"] = max(config.data_parallel, MAX_DEFAULT_SLOTS // config.data_parallel
                                         * config.data_parallel)
    if "max_seq_len" not in runtime:
        defaults["max_seq_len"] = loaded.config.max_position_embeddings
    if defaults:
        config = RuntimeConfig(**runtime, **defaults)
    adapters = read_lora_adapters(lora_adapters, loaded.config)
    config = size_for_lora(config, adapters, runtime)
    tokenizer = loaded.tokenizer
    tokenizer.max_length = min(tokenizer.max_length, config.max_seq_len)
    pipeline = TextGenerationPipeline(Engine(llama, loaded.config, loaded.params, config,
                                               layout=llama_sharding), tokenizer, loaded.name,
                                      draft_engine=load_draft_engine(draft_model, loaded.config, config, progress))
    serve_lora_adapters(pipeline, tokenizer, adapters)
    if adapters:
        phases("LoRA adapters %s resident (max_loras %d, max_lora_rank %d)", [a.name for a in adapters],
               config.max_loras, config.max_lora_rank)
    if warmup:
        warm_up(pipeline, phases)
    return tokenizer, pipeline


def warm_up(pipeline: Any, phases: Any) -> None:
    """``pipeline.warmup()`` between two progress lines: what it does, then how many programs it compiled or
    loaded from the compile cache, and how long it took."""
    from maxjax.progress import compile_counts, programs_note

    before, start = compile_counts(), time.perf_counter()
    phases("warming up %s: every program the batch and length buckets allow (--no-warmup / warmup=False "
           "compiles on first use instead)", getattr(pipeline, "model_name", "the model"))
    pipeline.warmup()
    phases("warm-up of %s done: %s in %.1f s", getattr(pipeline, "model_name", "the model"), programs_note(before),
           time.perf_counter() - start)


def load_draft_engine(draft_model: str | Path | None, target_config: Any, config: Any, progress: bool = False) -> Any:
    """The speculative draft model's own Engine (params, KV cache slots, programs), or None without one."""
    if draft_model is None:
        return None
    import dataclasses

    from maxjax.architectures import llama
    from maxjax.models import load_model
    from maxjax.runtime.engine import Engine

    draft = load_model(draft_model, dtype=config.dtype, tokenizer=False, matmul_precision=config.matmul_precision,
                       progress=progress)
    if draft.config.vocab_size != target_config.vocab_size:
        raise ValueError(f"draft_model: its vocabulary size {draft.config.vocab_size} differs from the target's "
                         f"{target_config.vocab_size}")
    # Greedy drafting of up to num_speculative_tokens tokens per call; no LoRA, no speculation of its own.
    draft_runtime = dataclasses.replace(config, speculative=None, max_loras=0, quantize=None,
                                        max_num_steps=max(config.max_num_steps, config.num_speculative_tokens))
    return Engine(llama, draft.config, draft.params, draft_runtime)


def load_pipeline(model: str | Path | None = None, task: PipelineTask | str = PipelineTask.TEXT_GENERATION,
                  progress: bool = True, **config: Any) -> tuple[Any, Any]:
    """(tokenizer, pipeline) for ``task``: a TokenGenerator, an EmbeddingsGenerator or an AudioGenerator.

    ``config``: the keywords of ``load_text_pipeline``, ``load_embeddings_pipeline`` or ``load_audio_pipeline``
    (an unknown one is a ValueError naming it). ``progress=False`` silences the line per loading phase."""
    try:
        task = PipelineTask(task)
    except ValueError:
        raise ValueError(f"task must be one of {[t.value for t in PipelineTask]}, got {task!r}") from None
    if task is PipelineTask.TEXT_GENERATION:
        return load_text_pipeline(model, progress=progress, **config)
    if task is PipelineTask.EMBEDDINGS_GENERATION:
        from maxjax.pipelines.embeddings import load_embeddings_pipeline

        return load_embeddings_pipeline(model, progress=progress, **config)
    from maxjax.pipelines.audio import load_audio_pipeline

    return load_audio_pipeline(model, task=task, progress=progress, **config)
