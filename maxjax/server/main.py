"""``serve``: open the port, load the models behind it, run uvicorn, drain on SIGTERM and exit 0.

The port answers from the start: ``/health`` is 503 ``{"status": "loading"}`` while the models load and warm up
(one log line per model and phase: weights, KV cache, programs compiled or loaded from the compile cache), then
200, as vLLM's and MAX's servers report readiness. A model that fails to load stops the server (exit 1).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from maxjax.platforms import default_to_cpu_without_accelerator
from maxjax.server.app import create_app
from maxjax.server.metrics import Metrics
from maxjax.server.models import ServedModels, plan_models, stop_schedulers

log = logging.getLogger("maxjax.server")


class GracefulServer(uvicorn.Server):
    """uvicorn's server with two changes on SIGTERM/SIGINT: the schedulers start draining at once (so
    in-flight streams end, finished or cancelled, before uvicorn's own connection timeout), and the signal
    is not re-raised after the shutdown (uvicorn re-raises it: the process would die of it, not exit 0)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._captured_signals.clear()
        if self._draining is None:
            self._draining = threading.Thread(target=self._on_exit, daemon=True)
            self._draining.start()


def serve(model_specs: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          runtime: dict[str, Any] | None = None, warmup: bool = True, drain_timeout: float = 30.0,
          log_level: str = "info", lora_adapters: dict[str, str] | None = None) -> int:
    """Serves ``model_specs`` (``[NAME=]SOURCE``; none: SmolLM2 as ``smollm2``) and ``lora_adapters`` ({name: PEFT
    folder}, on the first text model) until SIGTERM/SIGINT, lets in-flight requests finish (up to
    ``drain_timeout`` seconds, then cancels them); returns 0, or 1 when a model failed to load."""
    default_to_cpu_without_accelerator()
    logging.basicConfig(level=log_level.upper(), format="[maxjax] %(message)s")
    metrics = Metrics()
    models = ServedModels(plan_models(model_specs, lora_adapters))  # bad specs fail here, before the port opens
    runtime = dict(runtime or {})
    server: GracefulServer | None = None

    def load() -> None:
        models.load_all(runtime, metrics, warmup, progress=True)
        if models.error is not None and server is not None:
            server.should_exit = True

    for plan in models.plans:
        adapters = f" with LoRA adapters {sorted(plan.lora_adapters)}" if plan.lora_adapters else ""
        log.info("will serve %s (%s) from %s%s", plan.name, plan.task.value, plan.source or "the default model",
                 adapters)
    log.info("listening on http://%s:%d: /health answers 503 {\"status\": \"loading\"} until every model is ready",
             host, port)
    app = create_app(models, metrics, drain_timeout, load=load)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 10)
    server = GracefulServer(config, lambda: stop_schedulers(dict(models.ready), drain_timeout))
    server.run()
    if models.error is not None:
        log.error("a model failed to load: %s", models.error)
        return 1
    return 0
