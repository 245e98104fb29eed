"""A queued job's state changes once, under the queue's lock: to "running" when the worker takes it, or to
"expired" when its deadline passes first. The interleavings are forced step by step here (no sleeps):
a client whose deadline fires after the worker took its job gets no 504, and its job runs; a job that
expires leaves the queue and is counted as a timeout, never as "cancelled"."""

from __future__ import annotations

import asyncio
import queue

import pytest
from prometheus_client import REGISTRY

from service.config import Settings
from service.engine import Done, Job, JobQueue, Worker
from service.errors import QueueTimeoutError
from service.metrics import Metrics, RequestStats
from shortcuts.engine.sequence import Generation, Stats
from shortcuts.engine.settings import GenerationSettings


def _job(loop: asyncio.AbstractEventLoop, timeout: float | None = 10.0, arrival: float = 100.0) -> Job:
    return Job([5, 6], GenerationSettings(), loop, RequestStats(arrival=arrival), queue_timeout=timeout)


def test_the_worker_takes_a_job_then_expiring_it_fails() -> None:
    jobs, job = JobQueue(4), _job(asyncio.new_event_loop())
    jobs.put_nowait(job)
    assert jobs.get(now=lambda: 101.0) is job
    assert job.state == "running"
    assert not jobs.expire(job)
    assert job.state == "running"


def test_an_expired_job_leaves_the_queue_and_is_never_handed_out() -> None:
    jobs, job = JobQueue(4), _job(asyncio.new_event_loop())
    jobs.put_nowait(job)
    assert jobs.expire(job)
    assert job.state == "expired"
    assert jobs.qsize() == 0
    with pytest.raises(queue.Empty):
        jobs.get(block=False)
    assert not jobs.expire(job)  # once


def test_a_job_taken_past_its_deadline_is_handed_out_expired() -> None:
    jobs, late, fresh = JobQueue(4), _job(asyncio.new_event_loop()), _job(asyncio.new_event_loop(), arrival=105.0)
    jobs.put_nowait(late)
    jobs.put_nowait(fresh)
    assert jobs.get(now=lambda: 110.5) is late
    assert late.state == "expired"  # 10.5 s after it arrived, 10 s allowed
    assert jobs.get(now=lambda: 110.5) is fresh
    assert fresh.state == "running"


def test_jobs_waiting_at_close_are_expired() -> None:
    jobs, job = JobQueue(4), _job(asyncio.new_event_loop())
    jobs.put_nowait(job)
    assert jobs.close() == [job]
    assert job.state == "expired"
    assert not jobs.expire(job)
    assert jobs.get() is None


def test_a_deadline_that_fires_after_the_worker_took_the_job_is_no_504() -> None:
    """The client's timer fires while the job is queued, but the worker takes it before the client's
    expiry runs: ``expire`` answers False, so the client gets the job's events, not a 504."""

    async def run() -> tuple[object, list[str]]:
        jobs = JobQueue(4)
        job = _job(asyncio.get_running_loop(), timeout=0.0, arrival=0.0)  # already due
        seen: list[str] = []

        def worker_first(j: Job) -> bool:
            seen.append(f"worker took it: {jobs.get() is j}")
            expired = jobs.expire(j)
            seen.append(f"expired: {expired}")
            j.post(Done(Generation([], [], "length", Stats())))  # what the worker sends when it is done
            return expired

        job.expire = worker_first
        jobs.put_nowait(job)
        return await job._next(), seen

    event, seen = asyncio.run(run())
    assert seen == ["worker took it: True", "expired: False"]
    assert isinstance(event, Done)


def test_a_deadline_that_fires_while_queued_is_a_504_and_a_timeout(tiny_metrics: Metrics) -> None:
    async def run() -> Job:
        worker = Worker(Settings(model="m", jump=""))
        worker.metrics = tiny_metrics
        job = _job(asyncio.get_running_loop(), timeout=0.0, arrival=0.0)
        job.expire = worker._expire
        worker._queue.put_nowait(job)
        with pytest.raises(QueueTimeoutError, match="request timeout"):
            await job._next()
        return job

    job = asyncio.run(run())
    assert job.state == "expired"
    assert job.stats.failure == "timeout"
    assert _failures(tiny_metrics) == {"timeout": 1.0}


def test_the_worker_fails_a_job_it_took_late_as_a_timeout(tiny_metrics: Metrics) -> None:
    loop = asyncio.new_event_loop()
    worker = Worker(Settings(model="m", jump="", request_timeout_s=10.0))
    worker.metrics = tiny_metrics
    job = _job(loop, arrival=0.0)
    job.cancel()  # even if the client also left: the deadline decided first
    worker._queue.put_nowait(job)
    taken = worker._queue.get(now=lambda: 11.0)
    assert taken is job
    assert worker._start(job, batch=None) is None  # type: ignore[arg-type]  # never reaches the batch
    assert job.stats.failure == "timeout"
    assert _failures(tiny_metrics) == {"timeout": 1.0}
    loop.close()


def _failures(metrics: Metrics) -> dict[str, float]:
    return {s.labels["reason"]: s.value for family in metrics.registry.collect() for s in family.samples
            if s.name == "onejump_request_failure_total" and s.value}


@pytest.fixture
def tiny_metrics() -> Metrics:
    metrics = Metrics("m", num_layers=4)
    assert metrics.registry is not REGISTRY  # each test counts its own
    return metrics
