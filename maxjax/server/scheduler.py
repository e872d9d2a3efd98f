"""Schedulers: one thread per pipeline that owns it and drives it for every request of that model.

The HTTP side (asyncio) builds a context (which validates the request: nothing bad reaches the device),
``submit``s a ``Job`` and reads ``SchedulerResult``s from the job's asyncio queue. The thread loops:

  1. drop cancelled jobs (client gone) and free their KV cache slots;
  2. admit waiting jobs while the pipeline has free slots (``max_batch_size``); the rest stay queued (a text
     pipeline short of KV cache pages sets the newest job aside: back to the queue's front, preempted if it
     ran, and admits no more until a job finishes);
  3. one pipeline call over every active job (``next_token`` with the runtime's ``max_num_steps``, one
     step when it prefills a new job; ``encode``; ``next_chunk``): new jobs join running ones between
     calls (continuous batching);
  4. hand each job its new output at once (``SchedulerResult.active``), or ``complete`` and release it.

A pipeline call that raises is retried job by job, so a failure fails only the job that caused it.
``maxjax run-batch`` runs the same loop for throughput: ``first_token_alone`` off (a call that prefills keeps
``max_num_steps``) and ``fill_wait`` (an idle scheduler waits for a burst of arrivals to fill its first call).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from maxjax.interfaces import (GenerationStatus, LogProbabilities, SchedulerResult,
                               TextGenerationInputs)
from maxjax.pipelines.kv_admission import set_aside
from maxjax.runtime.kv_pages import KVCacheFull
from maxjax.server.metrics import Metrics

log = logging.getLogger("maxjax.server")


class ShuttingDown(RuntimeError):
    """The scheduler no longer accepts requests (the server is stopping)."""


@dataclass
class Job:
    """One request inside a scheduler: its context, where its results go, and its timing."""

    request_id: str
    context: Any
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue  # of (index, SchedulerResult); the jobs of one HTTP request may share it
    index: int = 0
    error: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    last_output: float | None = None
    state: Any = None  # per-scheduler state (the text stream of a text job)

    def emit(self, result: SchedulerResult) -> None:
        """Hands a result to the job's consumer (called from the scheduler thread)."""
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, (self.index, result))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Scheduler:
    """The loop; subclasses say how to step a batch of jobs (``step``) and free one (``free``)."""

    def __init__(self, model: str, capacity: int, metrics: Metrics):
        self.model = model
        self.capacity = capacity
        self.room = capacity  # admission limit: lowered while the pipeline is short of memory
        self.fill_wait = 0.0  # seconds an idle scheduler waits for a full batch (run-batch: requests arrive at once)
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[str, Job] = {}
        self._cancelled: set[str] = set()
        self._accepting = True
        self._running = True
        self._thread = threading.Thread(target=self._run, name=f"maxjax-scheduler-{model}", daemon=True)

    # -- the HTTP side ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, request_id: str) -> None:
        """The client is gone: the job is dropped (and its slot freed) before the next pipeline call."""
        with self._cond:
            if any(j.request_id == request_id for j in self._waiting) or request_id in self._active:
                self._cancelled.add(request_id)
                self._cond.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def stop(self, timeout: float) -> None:
        """Stops accepting, lets running and queued jobs finish for ``timeout`` seconds, cancels the rest."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while (self._waiting or self._active) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._cancelled.update(j.request_id for j in self._waiting)
            self._cancelled.update(self._active)
            self._running = False
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the scheduler thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not self._active and not self._cancelled:
                    self._cond.wait()
                self._wait_for_a_full_batch()
                self._drop_cancelled()
                if not self._running and not self._active:
                    return
                while self._waiting and len(self._active) < min(self.capacity, self.room):
                    job = self._waiting.popleft()
                    self._active[job.request_id] = job
                batch = dict(self._active)
                self.metrics.occupancy(self.model, len(self._waiting), len(batch), self.capacity)
            if batch:
                self._step_isolated(batch)

    def _wait_for_a_full_batch(self) -> None:
        """With ``fill_wait``, an idle scheduler lets a burst of arrivals fill its first call (held lock)."""
        deadline = time.monotonic() + self.fill_wait
        while (self.fill_wait and self._running and not self._active and not self._cancelled
               and len(self._waiting) < self.capacity and time.monotonic() < deadline):
            self._cond.wait(deadline - time.monotonic())

    def _drop_cancelled(self) -> None:
        for request_id in self._cancelled:
            queued = [j for j in self._waiting if j.request_id == request_id]
            for job in queued:
                self._waiting.remove(job)
            job = self._active.pop(request_id, None)
            if job is not None:
                self._free_quietly(job)
            for job in queued + ([job] if job is not None else []):
                self.metrics.request_done(self.model, "cancelled")
                job.emit(SchedulerResult.cancelled())
        self._cancelled.clear()

    def _step_isolated(self, batch: dict[str, Job]) -> None:
        try:
            finished = self.step(batch)
        except Exception:
            if len(batch) == 1:
                self._fail(next(iter(batch.values())))
                return
            log.exception("pipeline call failed for a batch of %d; retrying its requests one by one", len(batch))
            finished = []
            for job in batch.values():
                try:
                    finished += self.step({job.request_id: job})
                except Exception:
                    self._fail(job)
        with self._cond:
            for request_id in finished:
                self._active.pop(request_id, None)
            if finished:
                self.room = self.capacity

    def _fail(self, job: Job) -> None:
        log.exception("request %s failed", job.request_id)
        with self._cond:
            self._active.pop(job.request_id, None)
        self._free_quietly(job)
        job.error = "internal error while generating this request"
        self.metrics.request_done(self.model, "error")
        job.emit(SchedulerResult.cancelled())

    def _free_quietly(self, job: Job) -> None:
        try:
            self.free(job)
        except Exception:
            log.exception("freeing request %s failed", job.request_id)

    def _finish(self, job: Job, result: Any) -> None:
        self.free(job)
        self.metrics.request_done(self.model, "complete")
        job.emit(SchedulerResult.complete(result))

    # -- per pipeline ---------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Job]) -> list[str]:
        """One pipeline call over ``batch``; emits results; returns the ids of the jobs that finished."""
        raise NotImplementedError

    def free(self, job: Job) -> None:
        raise NotImplementedError


# ---- text generation ------------------------------------------------------------------------------------------

@dataclass
class TextDelta:
    """What one ``next_token`` call produced for one request, ready for a client.

    ``text`` is new visible text: incrementally detokenized, with any suffix that may still become a stop
    string held back. ``prompt_log_probabilities`` (echo) come with the first delta only; ``stop_token`` with the
    last one, when an eos / stop token id ended the request (completions list it in their log-probabilities, as
    OpenAI and vLLM do: a scoring client counts on one entry per sampled token).
    """

    tokens: list[int]
    text: str
    log_probabilities: list[LogProbabilities]
    final_status: GenerationStatus
    prompt_log_probabilities: list[LogProbabilities] = field(default_factory=list)
    stop_token: tuple[int, LogProbabilities | None] | None = None  # the eos / stop id that ended it (not text)


class TextScheduler(Scheduler):
    def __init__(self, model: str, tokenizer: Any, pipeline: Any, metrics: Metrics):
        super().__init__(model, pipeline.config.max_batch_size, metrics)
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.num_steps = pipeline.config.max_num_steps
        self.first_token_alone = True  # False (run-batch): throughput first, calls keep max_num_steps steps

    def step(self, batch: dict[str, Job]) -> list[str]:
        contexts = {rid: job.context for rid, job in batch.items()}
        while True:
            # A call that prefills new requests decodes one step only, so their first token leaves at once
            # (time to first token) instead of after max_num_steps steps of the running requests.
            starting = self.first_token_alone and any(batch[rid].last_output is None
                                                      or not self.pipeline.pages.holds(rid) for rid in contexts)
            try:
                outputs = self.pipeline.next_token(TextGenerationInputs(contexts, 1 if starting else self.num_steps))
                break
            except KVCacheFull:
                before = self.pipeline.pages.preemptions
                self._requeue(batch[set_aside(self.pipeline, contexts)], self.pipeline.pages.preemptions > before)
                contexts = {rid: ctx for rid, ctx in contexts.items() if rid in self._active}
        self.metrics.kv_pages(self.model, self.pipeline.pages.stats())
        now = time.perf_counter()
        finished = []
        for rid, out in outputs.items():
            job = batch[rid]
            delta = self._delta(job, out)
            self._record_latency(job, len(delta.tokens), now)
            if out.is_done:
                self._finish(job, delta)
                finished.append(rid)
            else:
                job.emit(SchedulerResult.active(delta))
        return finished

    def _requeue(self, job: Job, preempted: bool) -> None:
        """A job set aside for lack of KV cache pages (``preempted``: it had run) goes back to the queue's front."""
        with self._cond:
            self._active.pop(job.request_id, None)
            self._waiting.appendleft(job)
            self.room = len(self._active)
        if preempted:
            self.metrics.preempted(self.model)

    def _delta(self, job: Job, out: Any) -> TextDelta:
        ctx = job.context
        if job.state is None:
            job.state = self.tokenizer.stream_decoder()
        checker = self.pipeline.stop_checker(job.request_id)
        text = checker.take_new_text() if checker else job.state.push(out.tokens)
        if out.is_done and not checker:
            text += job.state.flush()
        lps = list(out.log_probabilities or [])
        echoed = []
        if job.last_output is None and ctx.log_probabilities_echo and ctx.log_probabilities:
            n = len(ctx.prompt_tokens) - 1
            echoed, lps = lps[:n], lps[n:]
        stop_token = ctx.stop_token() if out.is_done else None
        return TextDelta(list(out.tokens), text, lps, out.final_status, echoed, stop_token)

    def _record_latency(self, job: Job, num_tokens: int, now: float) -> None:
        if not num_tokens:
            return
        self.metrics.tokens(self.model, generated=num_tokens)
        if job.last_output is None:
            self.metrics.first_token(self.model, now - job.submitted)
            self.metrics.tokens(self.model, prompt=len(job.context.prompt_tokens))
            num_tokens -= 1
        else:
            self.metrics.inter_token(self.model, (now - job.last_output) / num_tokens, num_tokens)
        job.last_output = now

    def free(self, job: Job) -> None:
        if self.pipeline.pages.holds(job.request_id):
            self.pipeline.release(job.request_id)

    @property
    def free_slots(self) -> int:
        return self.pipeline.slots.num_free


# ---- embeddings and speech ----------------------------------------------------------------------------------

class EmbeddingsScheduler(Scheduler):
    """Every waiting input joins the next ``encode`` call (the pipeline plans its own bucketed batches)."""

    def __init__(self, model: str, pipeline: Any, metrics: Metrics, capacity: int = 256):
        super().__init__(model, capacity, metrics)
        self.pipeline = pipeline

    def step(self, batch: dict[str, Job]) -> list[str]:
        outputs = self.pipeline.encode({rid: job.context for rid, job in batch.items()})
        for rid, job in batch.items():
            self.metrics.tokens(self.model, prompt=len(job.context.prompt_tokens))
            self._finish(job, outputs[rid])
        return list(batch)

    def free(self, job: Job) -> None:
        pass


class AudioScheduler(Scheduler):
    """Speech requests share ``next_chunk`` calls; each chunk of audio goes out as soon as it is decoded."""

    def __init__(self, model: str, pipeline: Any, metrics: Metrics):
        super().__init__(model, pipeline.speech.config.max_batch_size, metrics)
        self.pipeline = pipeline

    def step(self, batch: dict[str, Job]) -> list[str]:
        outputs = self.pipeline.next_chunk({rid: job.context for rid, job in batch.items()})
        finished = []
        for rid, out in outputs.items():
            if out.is_done:
                self._finish(batch[rid], out)
                finished.append(rid)
            else:
                batch[rid].emit(SchedulerResult.active(out))
        return finished

    def free(self, job: Job) -> None:
        self.pipeline.release(job.context)

