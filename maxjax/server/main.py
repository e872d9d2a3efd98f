"""``serve``: load the models, run uvicorn, drain on SIGTERM and exit 0."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from maxjax.server.app import create_app
from maxjax.server.metrics import Metrics
from maxjax.server.models import load_served_models, stop_schedulers


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
          log_level: str = "info") -> int:
    """Loads the models, serves until SIGTERM/SIGINT, lets in-flight requests finish (up to ``drain_timeout``
    seconds, then cancels them), returns 0."""
    logging.basicConfig(level=log_level.upper(), format="[maxjax] %(message)s")
    metrics = Metrics()
    models = load_served_models(model_specs, runtime or {}, metrics, warmup=warmup)
    for name, served in models.items():
        logging.getLogger("maxjax.server").info("serving %s (%s) from %s", name, served.task.value,
                                                served.source or "the default model")
    app = create_app(models, metrics, drain_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 10)
    GracefulServer(config, lambda: stop_schedulers(models, drain_timeout)).run()
    return 0
