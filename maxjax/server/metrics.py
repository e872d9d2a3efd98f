"""Prometheus metrics of one server process (its own registry, so several apps in a process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests by status, tokens, queue depth, batch occupancy, KV cache pages and prefix hits, preemptions, time to
    first token, inter-token latency."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter("maxjax_requests", "Finished requests by status", ["model", "status"], registry=r)
        self._prompt = Counter("maxjax_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self._generated = Counter("maxjax_generation_tokens", "Tokens generated", ["model"], registry=r)
        self._queue = Gauge("maxjax_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r)
        self._active = Gauge("maxjax_batch_occupancy", "Requests in the running batch", ["model"], registry=r)
        self._capacity = Gauge("maxjax_batch_capacity", "Batch slots (max_batch_size)", ["model"], registry=r)
        self._ttft = Histogram("maxjax_time_to_first_token_seconds", "From arrival to the first generated token",
                               ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self._preempted = Counter("maxjax_preemptions", "Running requests preempted for lack of KV cache pages", ["model"],
                                  registry=r)
        self._pages = Gauge("maxjax_kv_cache_pages", "KV cache pages by state (total, used, free, cached)",
                            ["model", "state"], registry=r)
        self._hit_rate = Gauge("maxjax_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache, as a "
                               "fraction of those looked up", ["model"], registry=r)
        self._itl = Histogram("maxjax_inter_token_latency_seconds", "Time per generated token after the first",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)

    def request_done(self, model: str, status: str) -> None:
        """``status``: complete, cancelled, error, or rejected (HTTP 400 before scheduling)."""
        self._requests.labels(model, status).inc()

    def tokens(self, model: str, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self._prompt.labels(model).inc(prompt)
        if generated:
            self._generated.labels(model).inc(generated)

    def occupancy(self, model: str, waiting: int, active: int, capacity: int) -> None:
        self._queue.labels(model).set(waiting)
        self._active.labels(model).set(active)
        self._capacity.labels(model).set(capacity)

    def preempted(self, model: str) -> None:
        self._preempted.labels(model).inc()

    def kv_pages(self, model: str, stats: dict[str, float]) -> None:
        """``stats``: the text pipeline's ``pages.stats()``."""
        for state in ("total", "used", "free", "cached"):
            self._pages.labels(model, state).set(stats[f"kv_pages_{state}"])
        self._hit_rate.labels(model).set(stats["prefix_cache_hit_rate"])

    def first_token(self, model: str, seconds: float) -> None:
        self._ttft.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds_per_token: float, count: int) -> None:
        for _ in range(count):
            self._itl.labels(model).observe(seconds_per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
