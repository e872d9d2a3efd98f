"""The server's text scheduler on a tiny random Llama, in process: queueing beyond max_batch_size,
continuous batching equal to each request alone, cancellation, and a failing request failing alone."""

import asyncio

import jax
import numpy as np
import pytest

from conftest import require

require("prometheus_client")

from maxjax.architectures import llama  # noqa: E402
from maxjax.context import TextContext  # noqa: E402
from maxjax.interfaces import SamplingParams, SchedulerStatus, TextGenerationInputs  # noqa: E402
from maxjax.pipelines.text import TextGenerationPipeline  # noqa: E402
from maxjax.runtime.config import RuntimeConfig  # noqa: E402
from maxjax.runtime.engine import Engine  # noqa: E402
from maxjax.server.metrics import Metrics  # noqa: E402
from maxjax.server.scheduler import Job, TextScheduler  # noqa: E402
from maxjax.tokenizers.stream import StreamDecoder  # noqa: E402

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
RUNTIME = RuntimeConfig(max_batch_size=2, max_seq_len=32, max_num_steps=4, length_buckets=(32,))


class IdTokenizer:
    """Detokenization for the scheduler's text deltas: each id as ``<id>``."""

    def stream_decoder(self):
        return StreamDecoder(lambda ids: "".join(f"<{i}>" for i in ids))


class FailingPipeline(TextGenerationPipeline):
    """Raises whenever the request ``poison`` is in the batch (an internal failure of one request)."""

    def next_token(self, inputs):
        if "poison" in inputs.batch:
            raise RuntimeError("device failure")
        return super().next_token(inputs)


@pytest.fixture(scope="module")
def pipeline():
    p = llama.init_params(CFG, jax.random.key(0))
    return FailingPipeline(Engine(llama, CFG, dict(p, lm_head=p["lm_head"] * 8), RUNTIME))


def _context(rid: str, seed: int, max_new: int) -> TextContext:
    prompt = np.random.default_rng(seed).integers(4, CFG.vocab_size, 5 + seed).astype(np.int32)
    return TextContext(rid, prompt, max_length=RUNTIME.max_seq_len, eos_token_ids={3},
                       sampling_params=SamplingParams(max_new_tokens=max_new, top_k=0, temperature=0.9, seed=seed))


def _alone(pipeline, ctx: TextContext) -> list[int]:
    tokens = []
    while not ctx.is_done:
        tokens += pipeline.next_token(TextGenerationInputs({ctx.request_id: ctx}, 4))[ctx.request_id].tokens
    pipeline.release(ctx.request_id)
    return tokens


def test_queue_cancel_and_failure_isolation(pipeline):
    names = ["a", "b", "poison", "c", "d"]
    expected = {n: _alone(pipeline, _context(n, i, 6 + i)) for i, n in enumerate(names) if n != "poison"}
    metrics = Metrics()
    scheduler = TextScheduler("tiny", IdTokenizer(), pipeline, metrics)

    async def run():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [Job(n, _context(n, i, 6 + i), loop, queue, index=i) for i, n in enumerate(names)]
        scheduler.start()
        for job in jobs:
            scheduler.submit(job)
        scheduler.cancel("d")  # 5 jobs, 2 slots: "d" is still queued
        results: dict[str, list] = {n: [] for n in names}
        while sum(bool(r) and r[-1].stop_stream for r in results.values()) < len(names):
            index, result = await asyncio.wait_for(queue.get(), timeout=120)
            results[names[index]].append(result)
        return jobs, results

    try:
        jobs, results = asyncio.run(run())
    finally:
        scheduler.stop(timeout=5)
    final = {n: r[-1].status for n, r in results.items()}
    assert final == {"a": SchedulerStatus.COMPLETE, "b": SchedulerStatus.COMPLETE, "c": SchedulerStatus.COMPLETE,
                     "poison": SchedulerStatus.CANCELLED, "d": SchedulerStatus.CANCELLED}
    assert jobs[2].error and jobs[4].error is None
    for name in ("a", "b", "c"):
        deltas = [r.result for r in results[name]]
        tokens = [t for d in deltas for t in d.tokens]
        assert tokens == expected[name]  # sharing batches with others changes nothing
        assert "".join(d.text for d in deltas) == "".join(f"<{t}>" for t in tokens)
    assert pipeline.slots.num_free == RUNTIME.max_batch_size
    text = metrics.render().decode()
    for status, count in (("complete", 3), ("error", 1), ("cancelled", 1)):
        assert f'maxjax_requests_total{{model="tiny",status="{status}"}} {count}.0' in text


def test_short_of_kv_pages_the_scheduler_preempts_and_every_request_completes_unchanged():
    """8 pages of 8 positions for three requests that need 5 each: the newest running one is preempted (its
    pages freed, its tokens encoded again later) instead of failing, and every text equals its text alone."""
    runtime = RuntimeConfig(max_batch_size=4, max_seq_len=64, max_num_steps=4, length_buckets=(32, 64), page_size=8,
                            num_pages=8)
    p = llama.init_params(CFG, jax.random.key(0))
    pipe = TextGenerationPipeline(Engine(llama, CFG, dict(p, lm_head=p["lm_head"] * 8), runtime))

    def context(rid, seed):
        prompt = np.random.default_rng(seed).integers(4, CFG.vocab_size, 10).astype(np.int32)
        return TextContext(rid, prompt, max_length=64, sampling_params=SamplingParams(max_new_tokens=30, top_k=1,
                                                                                     ignore_eos=True))

    names = ["a", "b", "c"]
    expected = {n: _alone(pipe, context(n, i)) for i, n in enumerate(names)}
    metrics = Metrics()
    scheduler = TextScheduler("tiny", IdTokenizer(), pipe, metrics)

    async def run():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        scheduler.start()
        for i, n in enumerate(names):
            scheduler.submit(Job(n, context(n, i), loop, queue, index=i))
        results: dict[str, list] = {n: [] for n in names}
        while sum(bool(r) and r[-1].stop_stream for r in results.values()) < len(names):
            index, result = await asyncio.wait_for(queue.get(), timeout=120)
            results[names[index]].append(result)
        return results

    try:
        results = asyncio.run(run())
    finally:
        scheduler.stop(timeout=5)
    for n in names:
        assert results[n][-1].status == SchedulerStatus.COMPLETE
        assert [t for r in results[n] for t in r.result.tokens] == expected[n]
    assert pipe.pages.preemptions > 0 and pipe.engine.pool.num_used == 0
    assert f'maxjax_preemptions_total{{model="tiny"}} {float(pipe.pages.preemptions)}' in metrics.render().decode()
