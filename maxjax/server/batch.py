"""``maxjax run-batch``: an OpenAI Batch API file through the server's own routes, in process (no HTTP).

Each input line is ``{"custom_id", "method": "POST", "url", "body"}`` for ``/v1/chat/completions``,
``/v1/completions`` or ``/v1/embeddings``. Bodies go to the same FastAPI app ``maxjax serve`` runs, called as
an ASGI application: they are checked exactly as over HTTP, and every request joins the models' schedulers
(continuous batching), which run for throughput here (a new request does not cut a multi-step call short).

Every non-blank line gets one output line, in input order:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {"code", "message"} | null}``.
A request the server answered carries its response (HTTP 400 bodies included) and, unless it succeeded, an
``error`` too; a line that never became a request (not JSON, no ``custom_id``, a repeated ``custom_id``, a
URL or method the server does not take, ``stream: true``) has ``response: null`` and the ``error``, with its
``line`` number.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        out["line"] = line
    return out


def output_line(custom_id: Any, response: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": response,
            "error": error}


def parse_line(text: str, number: int, seen: dict[str, int]) -> tuple[Any, str, bytes] | dict[str, Any]:
    """(custom_id, url, JSON body) of one input line, or its finished output line when it cannot be sent.
    ``seen`` maps the custom_ids read so far to their line numbers."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        return output_line(None, None, _error("invalid_json", f"line {number} is not valid JSON: {error}", number))
    if not isinstance(item, dict):
        return output_line(None, None, _error("invalid_request", "a line must be a JSON object", number))
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return output_line(None, None, _error("invalid_request", "custom_id must be a non-empty string", number))
    if custom_id in seen:
        return output_line(custom_id, None, _error(
            "duplicate_custom_id", f"custom_id {custom_id!r} repeats line {seen[custom_id]}", number))
    seen[custom_id] = number
    method, url, body = item.get("method", "POST"), item.get("url"), item.get("body")
    if not isinstance(method, str) or method.upper() != "POST":
        return output_line(custom_id, None, _error("invalid_method", f"method must be POST, got {method!r}", number))
    if url not in URLS:
        return output_line(custom_id, None, _error("invalid_url", f"url must be one of {list(URLS)}, got {url!r}",
                                                   number))
    if not isinstance(body, dict):
        return output_line(custom_id, None, _error("invalid_request", "body must be a JSON object", number))
    if body.get("stream"):
        return output_line(custom_id, None, _error("invalid_request", "stream is not supported in a batch", number))
    return custom_id, url, json.dumps(body).encode()


async def call_app(app: Any, path: str, body: bytes) -> tuple[int, Any]:
    """POSTs ``body`` to ``path`` of an ASGI app in process; returns (status, decoded JSON body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("run-batch", 0), "server": ("run-batch", 0)}
    delivered = False
    status, chunks = 500, []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, {"error": {"message": raw.decode(errors="replace"), "type": "server_error"}}


def response_line(custom_id: str, status: int, body: Any) -> dict[str, Any]:
    """The output line of a request the app answered."""
    request_id = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    response = {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex[:24]}", "body": body}
    error = None
    if status != 200:
        detail = body.get("error", {}) if isinstance(body, dict) else {}
        error = _error(detail.get("code") or detail.get("type") or f"http_{status}",
                       detail.get("message") or f"HTTP {status}")
    return output_line(custom_id, response, error)


def _lines(source: TextIO) -> Iterator[tuple[int, str]]:
    for number, text in enumerate(source, start=1):
        if text.strip():
            yield number, text


def _tokens(line: dict[str, Any]) -> int:
    body = (line.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


async def run_lines(app: Any, source: TextIO, sink: TextIO, total: int | None, concurrency: int,
                    progress: bool = True) -> dict[str, int]:
    """Answers every line of ``source`` into ``sink``, in order; returns counts (lines, ok, failed)."""
    from maxjax.progress import RequestBar

    bar = RequestBar(total, progress, desc="run-batch")
    done: dict[int, dict[str, Any]] = {}
    counts = {"lines": 0, "ok": 0, "failed": 0}
    next_out = 0
    slots = asyncio.Semaphore(concurrency)

    def finish(index: int, line: dict[str, Any]) -> None:
        nonlocal next_out
        done[index] = line
        counts["ok" if line["error"] is None else "failed"] += 1
        bar.update(_tokens(line))
        while next_out in done:  # write in input order as soon as the lines before are written
            sink.write(json.dumps(done.pop(next_out), ensure_ascii=False) + "\n")
            next_out += 1

    async def run(index: int, custom_id: str, url: str, body: bytes) -> None:
        try:
            status, answer = await call_app(app, url, body)
            line = response_line(custom_id, status, answer)
        except Exception as error:  # noqa: BLE001 - one failed line must not lose the others
            line = output_line(custom_id, None, _error("server_error", f"{type(error).__name__}: {error}"))
        finally:
            slots.release()
        finish(index, line)

    seen: dict[str, int] = {}
    tasks = set()
    try:
        for index, (number, text) in enumerate(_lines(source)):
            counts["lines"] += 1
            parsed = parse_line(text, number, seen)
            if isinstance(parsed, dict):
                finish(index, parsed)
                continue
            await slots.acquire()
            task = asyncio.create_task(run(index, *parsed))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        bar.close()
    return counts


def run_batch_with_models(models: dict[str, Any], input_file: str | Path, output_file: str | Path, *,
                          progress: bool = True, concurrency: int | None = None) -> dict[str, int]:
    """``run-batch`` over already loaded ``ServedModel``s: their schedulers start, run the batch and stop (once:
    a scheduler does not restart)."""
    from maxjax.server.app import create_app
    from maxjax.server.metrics import Metrics
    from maxjax.server.models import stop_schedulers
    from maxjax.server.scheduler import TextScheduler

    input_file, output_file = Path(input_file), Path(output_file)
    with input_file.open(encoding="utf-8") as source:
        total = sum(1 for _ in _lines(source))
    app = create_app(models, next(iter(models.values())).scheduler.metrics if models else Metrics())
    schedulers = {id(m.scheduler): m.scheduler for m in models.values()}.values()  # adapters share their base's
    for scheduler in schedulers:
        if isinstance(scheduler, TextScheduler):
            scheduler.first_token_alone = False  # throughput: no client waits for a first token
        scheduler.fill_wait = 0.25  # the lines arrive together: the first call takes a full batch
        scheduler.start()
    concurrency = concurrency or max(64, 4 * max(s.capacity for s in schedulers))
    try:
        with input_file.open(encoding="utf-8") as source, output_file.open("w", encoding="utf-8") as sink:
            return asyncio.run(run_lines(app, source, sink, total, concurrency, progress))
    finally:
        stop_schedulers(models, timeout=0)


def run_batch(input_file: str | Path, output_file: str | Path, model_specs: list[str] | None = None, *,
              runtime: dict[str, Any] | None = None, warmup: bool = False, progress: bool = True,
              lora_adapters: dict[str, str] | None = None) -> dict[str, int]:
    """Loads the models (and adapters) as ``maxjax serve`` does and answers ``input_file`` into ``output_file``."""
    from maxjax.server.metrics import Metrics
    from maxjax.server.models import load_served_models

    if not Path(input_file).is_file():
        raise FileNotFoundError(f"input file {input_file} not found")
    models = load_served_models(model_specs, runtime or {}, Metrics(), warmup=warmup, lora_adapters=lora_adapters)
    return run_batch_with_models(models, input_file, output_file, progress=progress)
