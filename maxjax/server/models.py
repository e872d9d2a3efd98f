"""The models one server process serves: ``--model [NAME=]SOURCE``, the task read from the source.

* a folder whose ``config.json`` is a BERT encoder (sentence-transformers, MiniLM), or the built-in ``minilm``:
  embeddings;
* a folder with the SNAC codec in ``snac/`` (Orpheus), or ``random-orpheus`` (small random models): speech;
* anything else ``maxjax.load_model`` takes (GGUF file, HF folder, model-store name, the built-in ``smollm2``;
  none: SmolLM2): text.

The name a client sends as ``model`` is NAME, else the source itself when it is a built-in name (``smollm2``,
``minilm``, ``random-orpheus``), else the file or folder name without its extension; without any ``--model`` the
server serves SmolLM2 as ``smollm2``. ``--lora NAME=PATH`` adapters are served as models of their own name on
the first text model (their ``parent``), as vLLM's ``--lora-modules``.

The names are known before anything loads (``plan_models``), so the server can answer while they load:
``ServedModels`` holds the plan and each model once it is ready.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maxjax.interfaces import PipelineTask
from maxjax.server.metrics import Metrics
from maxjax.server.scheduler import AudioScheduler, EmbeddingsScheduler, Scheduler, TextScheduler
from maxjax.weights.sources import BUILTIN_MODELS, DEFAULT_TEXT_MODEL, builtin_name

RANDOM_ORPHEUS = "random-orpheus"
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"}
# RuntimeConfig fields that only text models take (speech gets the rest of the runtime, embeddings none of it).
_TEXT_ONLY = {"quantize", "speculative", "num_speculative_tokens", "max_num_steps"}
log = logging.getLogger("maxjax.server")


@dataclass
class ServedModel:
    """A loaded model (or a LoRA adapter on one: ``lora_name`` set, ``parent`` the base model's name)."""

    name: str
    task: PipelineTask
    source: str | None
    tokenizer: Any
    pipeline: Any
    scheduler: Scheduler
    created: int
    lora_name: str | None = None
    parent: str | None = None


@dataclass
class ModelPlan:
    """What ``--model`` / ``--lora`` asked for, before loading: the served name, its source and task."""

    name: str
    source: str | None
    task: PipelineTask
    lora_adapters: dict[str, str] = field(default_factory=dict)  # text models: {adapter name: PEFT folder}


def parse_model_spec(spec: str | None) -> tuple[str, str | None]:
    """``NAME=SOURCE`` or ``SOURCE`` -> (name, source); None is the default text model, named ``smollm2``."""
    if spec is None:
        return DEFAULT_TEXT_MODEL, None
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    if not source:
        raise ValueError(f"--model {spec!r}: empty source")
    if name:
        return name, source
    if source == RANDOM_ORPHEUS or builtin_name(source) is not None:
        return source, source
    return Path(source.rstrip("/")).stem or source, source


def task_of(source: str | None) -> PipelineTask:
    if source == RANDOM_ORPHEUS:
        return PipelineTask.AUDIO_GENERATION
    builtin = builtin_name(source)
    if builtin is not None:
        return PipelineTask(BUILTIN_MODELS[builtin].task)
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        if (path / "snac" / "config.json").is_file():
            return PipelineTask.AUDIO_GENERATION
        config = path / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model_type") in _ENCODER_TYPES:
            return PipelineTask.EMBEDDINGS_GENERATION
    return PipelineTask.TEXT_GENERATION


def plan_models(specs: list[str] | None, lora_adapters: dict[str, str] | None = None) -> list[ModelPlan]:
    """The served names, sources and tasks of ``--model`` specs; adapters go to the first text model. Refuses
    duplicate names (models and adapters share one namespace) before anything loads."""
    plans = []
    for spec in specs or [None]:
        name, source = parse_model_spec(spec)
        plan = ModelPlan(name, source, task_of(source))
        if plan.task is PipelineTask.TEXT_GENERATION and source is not None:
            from maxjax.weights.sources import resolve_source

            resolve_source(source)  # a missing file or unknown name fails now, not after the port opened
        plans.append(plan)
    names = [p.name for p in plans] + list(lora_adapters or {})
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--model/--lora: the name(s) {twice} are given twice; name models with NAME=SOURCE")
    if lora_adapters:
        text = [p for p in plans if p.task is PipelineTask.TEXT_GENERATION]
        if not text:
            raise ValueError("--lora: adapters need a text model to run on, and no --model serves text")
        text[0].lora_adapters = dict(lora_adapters)
    return plans


def load_served_model(plan: ModelPlan | str | None, runtime: dict[str, Any], metrics: Metrics, warmup: bool,
                      progress: bool = True) -> ServedModel:
    """Loads one model and its scheduler (not started). ``runtime``: RuntimeConfig fields (text models take all of
    them, speech those that are not text-only), plus ``draft_model`` for text models."""
    if not isinstance(plan, ModelPlan):
        plan = plan_models([plan] if plan is not None else None)[0]
    name, source, task = plan.name, plan.source, plan.task
    if task is PipelineTask.EMBEDDINGS_GENERATION:
        from maxjax.pipelines.embeddings import load_embeddings_pipeline

        options = {k: runtime[k] for k in ("matmul_precision",) if runtime.get(k) is not None}
        tokenizer, pipeline = load_embeddings_pipeline(source, warmup=warmup, progress=progress, **options)
        scheduler: Scheduler = EmbeddingsScheduler(name, pipeline, metrics)
    elif task is PipelineTask.AUDIO_GENERATION:
        from maxjax.pipelines.audio import load_audio_pipeline

        speech_runtime = {k: v for k, v in runtime.items() if k not in _TEXT_ONLY and k != "draft_model"}
        tokenizer, pipeline = load_audio_pipeline(None if source == RANDOM_ORPHEUS else source, warmup=warmup,
                                                  progress=progress, **speech_runtime)
        scheduler = AudioScheduler(name, pipeline, metrics)
    else:
        from maxjax.pipelines.registry import load_text_pipeline

        tokenizer, pipeline = load_text_pipeline(source, warmup=warmup, progress=progress,
                                                 lora_adapters=plan.lora_adapters or None, **runtime)
        scheduler = TextScheduler(name, tokenizer, pipeline, metrics)
    return ServedModel(name, task, source, tokenizer, pipeline, scheduler, int(time.time()))


def stop_schedulers(models: dict[str, ServedModel], timeout: float) -> None:
    """Stops every scheduler: no new requests, in-flight ones get ``timeout`` seconds, then are cancelled."""
    schedulers = {id(m.scheduler): m.scheduler for m in models.values()}.values()  # adapters share their base's
    threads = [threading.Thread(target=s.stop, args=(timeout,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class ServedModels:
    """The served names (known at start) and the models loaded so far: ``state`` is ``loading`` until every model
    is ready (``ok``), or ``failed`` (``error`` says why). ``add`` is called by the loading thread."""

    def __init__(self, plans: list[ModelPlan]):
        self.plans = plans
        self.tasks: dict[str, PipelineTask] = {p.name: p.task for p in plans}
        self.parents: dict[str, str] = {}
        for plan in plans:
            for adapter in plan.lora_adapters:
                self.tasks[adapter], self.parents[adapter] = plan.task, plan.name
        self.ready: dict[str, ServedModel] = {}
        self.error: str | None = None
        self.created = int(time.time())
        self._lock = threading.Lock()

    @classmethod
    def of(cls, models: dict[str, ServedModel]) -> "ServedModels":
        """Already loaded models (all ready)."""
        served = cls([])
        for name, model in models.items():
            served.tasks[name] = model.task
            if model.parent is not None:
                served.parents[name] = model.parent
        served.ready = dict(models)
        return served

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        return "ok" if len(self.ready) == len(self.tasks) else "loading"

    def add(self, model: ServedModel, adapters: dict[str, str] | None = None) -> None:
        """A loaded model (its scheduler started by the caller) and the adapters served on it."""
        entries = {model.name: model}
        for adapter, path in (adapters or {}).items():
            entries[adapter] = ServedModel(adapter, model.task, path, model.tokenizer, model.pipeline,
                                           model.scheduler, model.created, lora_name=adapter, parent=model.name)
        with self._lock:
            self.ready.update(entries)

    def load_all(self, runtime: dict[str, Any], metrics: Metrics, warmup: bool, progress: bool = True) -> None:
        """Loads (and warms up) every planned model in turn and starts its scheduler; records the first failure."""
        from maxjax.progress import compile_counts, programs_note

        try:
            for i, plan in enumerate(self.plans, 1):
                start, before = time.perf_counter(), compile_counts()
                log.info("loading model %d/%d: %s (%s) from %s", i, len(self.plans), plan.name, plan.task.value,
                         plan.source or "the default model, SmolLM2-135M-Instruct (Q4_1 GGUF)")
                model = load_served_model(plan, runtime, metrics, warmup, progress)
                model.scheduler.start()
                self.add(model, plan.lora_adapters)
                log.info("%s ready in %.1f s: %s%s", plan.name, time.perf_counter() - start, programs_note(before),
                         kv_note(model.pipeline))
            log.info("all models ready: %s", ", ".join(self.names()))
        except Exception as error:  # noqa: BLE001 -- reported, and the server exits with it
            log.exception("loading failed")
            self.error = f"{type(error).__name__}: {error}"

    def names(self) -> list[str]:
        return list(self.tasks)


def kv_note(pipeline: Any) -> str:
    """", KV cache N pages (X GB)" of a text or speech pipeline, "" for embeddings."""
    engine = getattr(pipeline, "engine", None) or getattr(getattr(pipeline, "speech", None), "engine", None)
    if engine is None or not hasattr(engine, "kv_cache_bytes"):
        return ""
    return f"; KV cache {engine.num_pages} pages of {engine.config.page_size} positions, " \
           f"{engine.kv_cache_bytes / 1e9:.2f} GB"


def load_served_models(specs: list[str] | None, runtime: dict[str, Any], metrics: Metrics,
                       warmup: bool = True, lora_adapters: dict[str, str] | None = None) -> dict[str, ServedModel]:
    """Every model of ``specs`` (and its adapters) loaded at once, not started, for callers that serve only when
    all are ready."""
    plans = plan_models(specs, lora_adapters)
    served = ServedModels(plans)
    for plan in plans:
        served.add(load_served_model(plan, runtime, metrics, warmup), plan.lora_adapters)
    return served.ready
