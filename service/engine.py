"""The serving engine: a worker thread owns the model and takes jobs from a bounded queue.

Route → ``Engine.submit`` (429 when the queue is full) → worker thread → ``EarlyExitDecoder`` →
per-token events back to the event loop → stats → metrics. No torch work runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from service.config import Settings
from service.errors import NotReadyError, OverloadedError, QueueTimeoutError, ServiceError
from service.metrics import Metrics, RequestStats

log = logging.getLogger("onejump.service")
_KIND = {"exited": "early", "full": "full", "accepted": "verified", "corrected": "full"}


@dataclass
class Done:
    generation: Any  # shortcuts.engine.Generation


@dataclass
class Job:
    """One request in flight. Events (TokenTrace, Done or ServiceError) arrive on ``events``."""

    prompt_ids: list[int]
    settings: Any  # shortcuts.engine.GenerationSettings
    loop: asyncio.AbstractEventLoop
    stats: RequestStats
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_hit: bool = False  # the route found a stop string: cancelling then is a normal finish

    def post(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self, stop_hit: bool = False) -> None:
        self.stop_hit = self.stop_hit or stop_hit
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[Any]:
        """Token traces until the generation is done; raises the job's error if it failed."""
        while True:
            event = await self.events.get()
            if isinstance(event, ServiceError):
                raise event
            yield event
            if isinstance(event, Done):
                return


class Engine:
    """Loads the model in the background; ``ready`` once the decoder exists."""

    def __init__(self, settings: Settings, on_fatal: Callable[[str], None] | None = None):
        self.settings = settings
        self.error: str | None = None
        self.decoder: Any = None
        self.metrics: Metrics | None = None
        self.default_threshold = 0.9
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=settings.queue_size)
        self._on_fatal = on_fatal
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="onejump-engine", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    @property
    def lm(self) -> Any:
        return self.decoder.lm

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            while True:  # make room for the sentinel: drop what still waits
                try:
                    self._queue.put_nowait(None)
                    break
                except queue.Full:
                    self._fail(self._queue.get_nowait(), NotReadyError("the server is shutting down"), "shutdown")
            self._thread.join(timeout)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and self.error is None

    # --- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], gen_settings: Any) -> Job:
        if not self.ready:
            raise NotReadyError(self.error or "the model is still loading; try again when /ready answers 200")
        job = Job(prompt_ids, gen_settings, asyncio.get_running_loop(), RequestStats(arrival=time.monotonic()))
        job.stats.prompt_tokens = len(prompt_ids)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            assert self.metrics is not None
            self.metrics.failure.labels(self.metrics.model_name, "queue_full").inc()
            size = self.settings.queue_size
            raise OverloadedError(f"the queue is full ({size} requests waiting); retry later") from None
        self._gauges()
        return job

    def _gauges(self, running: int | None = None) -> None:
        if self.metrics is not None:
            self.metrics.waiting.labels(self.metrics.model_name).set(self._queue.qsize())
            if running is not None:
                self.metrics.running.labels(self.metrics.model_name).set(running)

    # --- the worker thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load()
        except Exception as e:  # a clear message for /ready and the log, then stop the server
            self.error = f"start-up failed: {e}"
            log.error(self.error)
            self._ready.set()
            if self._on_fatal is not None:
                self._on_fatal(self.error)
            return
        self._ready.set()
        log.info("engine ready: %s", self.settings.model_name)
        while (job := self._queue.get()) is not None:
            self._gauges(running=1)
            self._run(job)
            self._gauges(running=0)

    def _load(self) -> None:
        from service.loading import load_decoder

        self.decoder, self.default_threshold = load_decoder(self.settings)
        self.metrics = Metrics(self.settings.model_name, self.decoder.num_layers)

    def _fail(self, job: Job | None, error: ServiceError, reason: str) -> None:
        if job is None:
            return
        job.stats.failure = reason
        if self.metrics is not None:
            self.metrics.record(job.stats)
        job.post(error)

    def _run(self, job: Job) -> None:
        s = job.stats
        s.started = time.monotonic()
        if job.cancelled.is_set():
            return self._fail(job, ServiceError("cancelled"), "cancelled")
        if s.started - s.arrival > self.settings.request_timeout_s:
            return self._fail(job, QueueTimeoutError(f"waited {s.started - s.arrival:.1f}s in the queue, longer than "
                                                f"the {self.settings.request_timeout_s:g}s request timeout"), "timeout")
        try:
            generation = self.decoder.generate(job.prompt_ids, job.settings, on_token=lambda t: self._token(job, t))
        except Exception as e:
            log.exception("generation failed")
            return self._fail(job, ServiceError(f"generation failed: {e}"), "error")
        self._finish(job, generation)
        return None

    def _token(self, job: Job, trace: Any) -> bool:
        now = time.monotonic()
        s = job.stats
        if s.first_token is None:
            s.first_token = now
        s.token_times.append(now)
        s.exit_layers.append(trace.exit_layer)
        s.confidences.append(trace.confidence)
        s.kinds.append(_KIND.get(trace.kind, "full"))
        job.post(trace)
        return not job.cancelled.is_set()

    def _finish(self, job: Job, generation: Any) -> None:
        s = job.stats
        s.finished = time.monotonic()
        s.layers_computed, s.layers_skipped = generation.stats.layers_computed, generation.stats.layers_skipped
        if generation.finish_reason == "abort" and not job.stop_hit:
            s.failure = "cancelled"  # the client went away
        else:
            s.finish_reason = "stop" if job.stop_hit else generation.finish_reason
        assert self.metrics is not None
        self.metrics.record(s)
        job.post(Done(generation))
