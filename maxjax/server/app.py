"""The FastAPI app: OpenAI-compatible routes over the schedulers of the served models.

Routes: ``/v1/completions``, ``/v1/chat/completions`` (SSE when ``stream``), ``/v1/embeddings``,
``/v1/audio/speech`` (24 kHz WAV), ``/v1/models``, ``/health`` (slot and KV page occupancy per model), ``/metrics``,
and ``/tokenize``, ``/detokenize``, ``/tokenizer_info`` (``server/tokenize.py``).
A request is checked and turned into a context on the event loop; only the model's scheduler thread
touches the device. Bad requests get HTTP 400 with an OpenAI error body whose ``param`` names the field
(malformed JSON: ``param`` null and the line and column; unknown fields: named); an unknown model is 404
``model_not_found``. The port opens before the models load: ``/health`` answers 503 ``{"status": "loading"}``
until every model is ready (then 200), and a request for a model still loading gets 503.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from maxjax.interfaces import (AudioGenerationRequest, PipelineTask, SamplingParams, SchedulerStatus,
                               TextGenerationRequest)
from maxjax.server import responses as R
from maxjax.server.metrics import Metrics
from maxjax.server.models import ServedModel, ServedModels, stop_schedulers
from maxjax.server.openai_protocol import (EXTENSIONS, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                           InvalidRequest, ModelNotFound, ModelNotReady, SpeechRequest, error_body)
from maxjax.server.scheduler import Job, ShuttingDown
from maxjax.server.tokenize import add_tokenizer_routes


class GenerationFailed(RuntimeError):
    """A scheduled request ended without a result (internal error, or cancelled by shutdown)."""


def create_app(models: dict[str, ServedModel] | ServedModels, metrics: Metrics, drain_timeout: float = 30.0,
               load: Callable[[], None] | None = None) -> FastAPI:
    """The app over ``models``: loaded models (a dict; their schedulers start and stop with the app's lifespan), or
    a ``ServedModels`` plan that ``load`` fills in a thread started once the app is up (so the port answers
    ``/health`` while the models load)."""
    served_models = models if isinstance(models, ServedModels) else ServedModels.of(models)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for scheduler in {id(m.scheduler): m.scheduler for m in served_models.ready.values()}.values():
            scheduler.start()
        if load is not None:
            threading.Thread(target=load, name="maxjax-model-loader", daemon=True).start()
        yield
        await asyncio.to_thread(stop_schedulers, dict(served_models.ready), drain_timeout)

    app = FastAPI(title="maxjax", lifespan=lifespan)
    _error_handlers(app, metrics)
    text, embeddings, audio = (PipelineTask.TEXT_GENERATION, PipelineTask.EMBEDDINGS_GENERATION,
                               PipelineTask.AUDIO_GENERATION)

    def model_for(name: str, task: PipelineTask) -> ServedModel:
        served_task = served_models.tasks.get(name)
        if served_task is None:
            raise ModelNotFound(f"The model {name!r} does not exist: this server serves "
                                f"{sorted(served_models.tasks)}")
        if served_task is not task:
            raise InvalidRequest("model", f"model {name!r} serves {served_task.value}, not {task.value}")
        served = served_models.ready.get(name)
        if served is None:
            if served_models.error is not None:
                raise ModelNotReady(f"model {name!r} failed to load: {served_models.error}")
            raise ModelNotReady(f"model {name!r} is still loading; /health answers 200 once every model is ready")
        return served

    def text_model(name: str | None) -> ServedModel:
        """The served text model ``name`` (None: the first one)."""
        if name is None:
            name = next((n for n, t in served_models.tasks.items() if t is text), None)
            if name is None:
                raise InvalidRequest("model", "no text model is served here")
        return model_for(name, text)

    add_tokenizer_routes(app, text_model)  # /tokenize, /detokenize, /tokenizer_info (vLLM's shape)

    @app.get("/health")
    async def health() -> Any:
        state = served_models.state
        body: dict[str, Any] = {"status": state, "models": {
            name: _occupancy(served_models.ready[name]) if name in served_models.ready
            else {"task": task.value, "status": "loading"} for name, task in served_models.tasks.items()}}
        if served_models.error is not None:
            body["error"] = served_models.error
        return body if state == "ok" else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = []
        for name, task in served_models.tasks.items():
            ready = served_models.ready.get(name)
            entry = {"id": name, "object": "model", "created": ready.created if ready else served_models.created,
                     "owned_by": "maxjax", "task": task.value, "ready": ready is not None}
            if name in served_models.parents:
                entry["parent"] = served_models.parents[name]
            data.append(entry)
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = model_for(body.model, text)
        request_id = R.new_id("cmpl")
        protocol_requests = body.to_requests(request_id, served.lora_name)
        for protocol_request in protocol_requests[:1]:  # one response_format for all prompts
            _check_schema(protocol_request, "response_format")
        contexts = [_context(served, r, "prompt") for r in protocol_requests]
        echo = [_prompt_echo(served, p, c) if body.echo else ("", None) for p, c in zip(body.prompts(), contexts)]
        jobs = _submit(served, contexts)
        choices = [R.Choice(i, len(c.prompt_tokens)) for i, c in enumerate(contexts)]
        token_text, created = R.TokenText(served.tokenizer), R.now()
        scored = R.prompt_only if body.max_tokens == 0 else (lambda delta: delta)

        def choice_json(i: int, delta: Any, first: bool) -> dict[str, Any]:
            text = choices[i].text if delta is None else delta.text
            echo_text, echo_tokens = echo[i] if first else ("", None)
            offset = 0 if first else len(echo[i][0]) + len(choices[i].text) - len(text)  # of this chunk's text
            return R.completion_choice(choices[i], echo_text + text, delta, body.logprobs, token_text, echo_tokens,
                                       offset)

        if body.stream:
            async def events() -> AsyncIterator[str]:
                started = [False] * len(jobs)
                async for i, result in _results(served, jobs):
                    if result.result is not None:
                        delta = scored(result.result)
                        choices[i].add(delta)
                        first, started[i] = not started[i], True
                        chunk = R.completion_body(request_id, served.name, [choice_json(i, delta, first)],
                                                  None, created)
                        yield R.sse(chunk)
                if _wants_usage(body):
                    yield R.sse(R.completion_body(request_id, served.name, [], R.usage(choices), created))

            return _event_stream(events())
        async for i, result in _results(served, jobs, request):
            if result.result is not None:
                choices[i].add(scored(result.result))
        return R.completion_body(request_id, served.name, [choice_json(i, None, True) for i in range(len(jobs))],
                                 R.usage(choices), created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = model_for(body.model, text)
        request_id = R.new_id("chatcmpl")
        protocol_request = body.to_request(request_id, served.lora_name)
        tools = _tool_mode(body, served)
        _check_schema(protocol_request, "tool_choice" if tools.forced else "response_format")
        jobs = _submit(served, [_context(served, protocol_request, "messages")])
        choice = R.Choice(0, len(jobs[0].context.prompt_tokens))
        top = (body.top_logprobs or 0) if body.logprobs else None
        token_text, created = R.TokenText(served.tokenizer), R.now()
        if body.stream:
            async def events() -> AsyncIterator[str]:
                yield R.sse(R.chat_chunk(request_id, served.name, created, {"role": "assistant", "content": ""}))
                async for _, result in _results(served, jobs):
                    delta = result.result
                    if delta is None:
                        continue
                    choice.add(delta)
                    if not tools.active and (delta.text or (top is not None and delta.tokens)):
                        lp = R.chat_logprobs(delta.tokens, delta.log_probabilities, top, token_text) \
                            if top is not None else None
                        yield R.sse(R.chat_chunk(request_id, served.name, created, {"content": delta.text}, None, lp))
                message, reason = R.chat_message(choice, tools, request_id)
                final: dict[str, Any] = {}
                if tools.active:  # the reply is parsed once it is whole: content and calls come last
                    final = {"content": message["content"]}
                    if "tool_calls" in message:
                        final["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                lp = R.chat_logprobs(choice.tokens, choice.log_probabilities, top, token_text) \
                    if tools.active and top is not None else None
                yield R.sse(R.chat_chunk(request_id, served.name, created, final, reason, lp))
                if _wants_usage(body):
                    yield R.sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                 "model": served.name, "choices": [], "usage": R.usage([choice])})

            return _event_stream(events())
        async for _, result in _results(served, jobs, request):
            if result.result is not None:
                choice.add(result.result)
        return R.chat_body(request_id, served.name, created, choice, tools, top, token_text)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request):
        import numpy as np

        served = model_for(body.model, embeddings)
        if body.dimensions is not None and body.dimensions != served.pipeline.embedding_dim:
            raise InvalidRequest("dimensions", f"dimensions must be {served.pipeline.embedding_dim} for this model "
                                               f"(no truncation), got {body.dimensions}")
        request_id = R.new_id("embd")
        contexts = [_context(served, TextGenerationRequest(f"{request_id}-{i}", i, served.name, prompt=x), "input")
                    for i, x in enumerate(body.inputs())]
        jobs = _submit(served, contexts)
        vectors: dict[int, Any] = {}
        async for i, result in _results(served, jobs, request):
            if result.result is not None:
                vectors[i] = np.asarray(result.result.embeddings, np.float32)
        data = [{"object": "embedding", "index": i, "embedding": (
            base64.b64encode(vectors[i].astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
            else vectors[i].tolist())} for i in range(len(contexts))]
        tokens = sum(len(c.prompt_tokens) for c in contexts)
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request):
        import numpy as np
        import soundfile

        served = model_for(body.model, audio)
        model = f"{served.name}:{body.voice}" if body.voice else served.name
        params = SamplingParams(max_new_tokens=body.max_tokens, seed=body.seed)
        speech_request = AudioGenerationRequest(R.new_id("speech"), 0, model, input=body.input,
                                                sampling_params=params)
        jobs = _submit(served, [_context(served, speech_request, "input")])
        chunks = []
        async for _, result in _results(served, jobs, request):
            if result.result is not None and result.result.audio_data.size:
                chunks.append(result.result.audio_data)
        audio_data = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
        buffer = io.BytesIO()
        soundfile.write(buffer, audio_data, served.pipeline.decoder_sample_rate, format="WAV", subtype="PCM_16")
        return Response(buffer.getvalue(), media_type="audio/wav")

    return app


# ---- request plumbing -----------------------------------------------------------------------------------------

def _context(served: ServedModel, request: Any, param: str) -> Any:
    """The pipeline context of a request; the tokenizer's ValueError becomes a 400 naming ``param``."""
    try:
        return served.tokenizer.build_context(request)
    except ValueError as error:
        message = str(error)
        field = message.split(":", 1)[0] if message.split(":", 1)[0] in ("model", "input", "prompt") else param
        raise InvalidRequest("voice" if field == "model" else field, message) from None


def _check_schema(request: TextGenerationRequest, param: str) -> None:
    from maxjax.tokenizers.base import json_schema_of

    try:
        schema = json_schema_of(request.response_format)
        if schema is not None:
            from maxjax.pipelines.structured import check_json_schema

            check_json_schema(schema)
    except ValueError as error:
        raise InvalidRequest(param, str(error)) from None


def _tool_mode(body: ChatCompletionRequest, served: ServedModel) -> R.ToolMode:
    forced = body.forced_tool_schema()
    if forced is not None:
        return R.ToolMode(forced=True, forced_name=forced[1])
    if not body.tools or body.tool_choice == "none":
        return R.ToolMode()
    from maxjax.pipelines.tools import require_tool_parser

    try:
        return R.ToolMode(parser=require_tool_parser(served.tokenizer, served.name))
    except ValueError as error:
        raise InvalidRequest("tools", f"{error} (tool_choice 'required' or a named function works with any "
                                      "model: the reply is constrained to the function's JSON arguments)") from None


def _prompt_echo(served: ServedModel, prompt: Any, context: Any) -> tuple[str, list[int]]:
    text = prompt if isinstance(prompt, str) else served.tokenizer.decode_tokens(prompt)
    return text, [int(t) for t in context.prompt_tokens]


def _submit(served: ServedModel, contexts: list[Any]) -> list[Job]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    jobs = [Job(c.request_id, c, loop, queue, index=i) for i, c in enumerate(contexts)]
    for job in jobs:
        served.scheduler.submit(job)
    return jobs


async def _results(served: ServedModel, jobs: list[Job], watch: Request | None = None) -> AsyncIterator[Any]:
    """(index, SchedulerResult) of ``jobs`` as they come, until all are final. Unfinished jobs are cancelled
    when the consumer stops early: a closed stream, or (``watch``) a client that disconnected while waiting."""
    pending = {job.index for job in jobs}
    queue = jobs[0].results
    try:
        while pending:
            try:
                index, result = await asyncio.wait_for(queue.get(), timeout=0.5 if watch is not None else None)
            except asyncio.TimeoutError:
                if await watch.is_disconnected():
                    return
                continue
            if result.stop_stream:
                pending.discard(index)
            if result.status is SchedulerStatus.CANCELLED:
                raise GenerationFailed(jobs[index].error or "the request was cancelled (server shutting down)")
            yield index, result
    finally:
        for job in jobs:
            if job.index in pending:
                served.scheduler.cancel(job.request_id)


def _wants_usage(body: Any) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except GenerationFailed as error:
            yield R.sse(error_body(str(error), kind="server_error"))
        yield R.sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream")


def _occupancy(served: ServedModel) -> dict[str, Any]:
    scheduler = served.scheduler
    out = {"task": served.task.value, "active": scheduler.num_active, "queued": scheduler.num_waiting,
           "max_batch_size": scheduler.capacity}
    slots = getattr(served.pipeline, "slots", None) or getattr(getattr(served.pipeline, "speech", None), "slots", None)
    if slots is not None:
        out["free_slots"] = slots.num_free
    pages = getattr(served.pipeline, "pages", None)
    if pages is not None:  # KV cache pages used / free / cached, prefix-cache hit rate, preemptions
        out.update(pages.stats())
    engine = getattr(served.pipeline, "engine", None)
    if engine is not None and hasattr(engine, "kv_cache_bytes"):
        out["kv_cache_bytes"] = int(engine.kv_cache_bytes)
    speculative = getattr(served.pipeline, "speculative", None)
    if speculative is not None:  # speculative decoding rounds, tokens drafted and accepted so far
        out["speculative"] = dict(speculative.stats)
    if served.lora_name is not None:
        out["parent"] = served.parent
    return out


def _field_path(error: dict[str, Any]) -> str:
    """The field path of a pydantic error (``messages.0.role``), without the union members pydantic names in the
    location (e.g. "str", "list[int]")."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    return ".".join(p for p in loc if not (p.startswith(("str", "list", "dict", "int")) or "[" in p)) or "body"


def _json_error(body: Any, error: dict[str, Any]) -> str:
    """'the request body is not valid JSON: <reason> at line L column C' from FastAPI's json_invalid error."""
    reason = (error.get("ctx") or {}).get("error", "JSON decode error")
    loc = error.get("loc", ())
    position = loc[-1] if loc and isinstance(loc[-1], int) else None
    if position is None or not isinstance(body, (str, bytes)):
        return f"the request body is not valid JSON: {reason}"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"the request body is not valid JSON: {reason} at line {line} column {column} (character {position})"


def _error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def rejected(message: str, param: str | None, code: str | None = None, status: int = 400) -> JSONResponse:
        metrics.request_done("-", "rejected")
        kind = "unavailable" if status == 503 else "invalid_request_error"
        return JSONResponse(error_body(message, param, kind=kind, code=code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        first = errors[0]
        if first.get("type") == "json_invalid":
            return rejected(_json_error(error.body, first), None)
        unknown = [_field_path(e) for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:
            return rejected(f"Unrecognized request argument(s) supplied: {', '.join(unknown)} (besides OpenAI's "
                            f"fields this server takes the extensions {', '.join(EXTENSIONS)})", unknown[0])
        path = _field_path(first)
        return rejected(f"{path}: {first.get('msg', 'invalid value')}", path)

    @app.exception_handler(InvalidRequest)
    async def on_invalid(_: Request, error: InvalidRequest) -> JSONResponse:
        return rejected(str(error), error.param, error.code, error.status)

    @app.exception_handler(ShuttingDown)
    async def on_shutdown(_: Request, error: ShuttingDown) -> JSONResponse:
        return JSONResponse(error_body(str(error), kind="unavailable"), status_code=503)

    @app.exception_handler(GenerationFailed)
    async def on_failed(_: Request, error: GenerationFailed) -> JSONResponse:
        return JSONResponse(error_body(str(error), kind="server_error"), status_code=500)
