"""The models one server process serves: ``--model [NAME=]SOURCE``, the task read from the source.

* a folder whose ``config.json`` is a BERT encoder (sentence-transformers, MiniLM): embeddings;
* a folder with the SNAC codec in ``snac/`` (Orpheus), or ``random-orpheus`` (small random models): speech;
* anything else ``maxjax.load_model`` takes (GGUF file, HF folder, model-store name, none = SmolLM2): text.

The name a client sends as ``model`` is NAME, else the file or folder name without its extension.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maxjax.interfaces import PipelineTask
from maxjax.server.metrics import Metrics
from maxjax.server.scheduler import AudioScheduler, EmbeddingsScheduler, Scheduler, TextScheduler

RANDOM_ORPHEUS = "random-orpheus"
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"}


@dataclass
class ServedModel:
    name: str
    task: PipelineTask
    source: str | None
    tokenizer: Any
    pipeline: Any
    scheduler: Scheduler
    created: int


def parse_model_spec(spec: str | None) -> tuple[str, str | None]:
    """``NAME=SOURCE`` or ``SOURCE`` -> (name, source); None is the default text model."""
    if spec is None:
        return "SmolLM2-135M-Instruct", None
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    if not source:
        raise ValueError(f"--model {spec!r}: empty source")
    return name or Path(source.rstrip("/")).stem or source, source


def task_of(source: str | None) -> PipelineTask:
    if source == RANDOM_ORPHEUS:
        return PipelineTask.AUDIO_GENERATION
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        if (path / "snac" / "config.json").is_file():
            return PipelineTask.AUDIO_GENERATION
        config = path / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model_type") in _ENCODER_TYPES:
            return PipelineTask.EMBEDDINGS_GENERATION
    return PipelineTask.TEXT_GENERATION


def load_served_model(spec: str | None, runtime: dict[str, Any], metrics: Metrics, warmup: bool) -> ServedModel:
    """Loads one model and its scheduler (not started). ``runtime``: RuntimeConfig fields for text/speech."""
    name, source = parse_model_spec(spec)
    task = task_of(source)
    if task is PipelineTask.EMBEDDINGS_GENERATION:
        from maxjax.pipelines.embeddings import load_embeddings_pipeline

        tokenizer, pipeline = load_embeddings_pipeline(source, warmup=warmup)
        scheduler: Scheduler = EmbeddingsScheduler(name, pipeline, metrics)
    elif task is PipelineTask.AUDIO_GENERATION:
        from maxjax.pipelines.audio import load_audio_pipeline

        speech_runtime = {k: v for k, v in runtime.items() if k != "max_num_steps"}
        tokenizer, pipeline = load_audio_pipeline(None if source == RANDOM_ORPHEUS else source, warmup=warmup,
                                                  **speech_runtime)
        scheduler = AudioScheduler(name, pipeline, metrics)
    else:
        from maxjax.pipelines.registry import load_text_pipeline

        tokenizer, pipeline = load_text_pipeline(source, warmup=warmup, **runtime)
        scheduler = TextScheduler(name, tokenizer, pipeline, metrics)
    return ServedModel(name, task, source, tokenizer, pipeline, scheduler, int(time.time()))


def stop_schedulers(models: dict[str, ServedModel], timeout: float) -> None:
    """Stops every scheduler: no new requests, in-flight ones get ``timeout`` seconds, then are cancelled."""
    import threading

    threads = [threading.Thread(target=m.scheduler.stop, args=(timeout,)) for m in models.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def load_served_models(specs: list[str] | None, runtime: dict[str, Any], metrics: Metrics,
                       warmup: bool = True) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for spec in specs or [None]:
        model = load_served_model(spec, runtime, metrics, warmup)
        if model.name in models:
            raise ValueError(f"--model: two models are named {model.name!r}; name them with NAME=SOURCE")
        models[model.name] = model
    return models
