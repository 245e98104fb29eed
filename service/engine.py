"""The serving side of the engine: a worker thread owns the model and takes jobs from a bounded queue.

Route → ``Worker.submit`` (429 when the queue is full) → worker thread → the engine's ``Batch``
(``shortcuts.engine.api``) → per-token events back to the event loop → stats → metrics. No torch work
runs on the event loop.

The worker runs a continuous batch: between token steps it admits queued jobs while the batch
has a free slot (each prompt is prefilled on its own), drops the jobs whose client went away or
whose stop string was found, then steps the batch; each step's ``SequenceOutput``s (new tokens, a
finish) go to their jobs. A finished sequence frees its slot at once. ``max_batch_size`` 1 decodes
one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Union

from prometheus_client import Histogram

from service.config import Settings
from service.errors import ClientGoneError, NotReadyError, OverloadedError, QueueTimeoutError, ServiceError
from service.loading import ExitPolicy, load_decoder
from service.metrics import Metrics, RequestStats

if TYPE_CHECKING:  # the engine's types; torch loads in the worker thread, never at import
    from shortcuts.engine.api import Batch, Engine, Generation, SequenceHandle, SequenceOutput, TokenTrace, TopLogprobs
    from shortcuts.engine.settings import GenerationSettings

Running = dict[int, tuple["Job", "SequenceHandle"]]  # id(sequence) -> (job, sequence)

log = logging.getLogger("onejump.service")
_KIND = {"exited": "early", "full": "full", "accepted": "verified", "corrected": "full"}


def layers_saved(generation: Generation, num_layers: int) -> int:
    """Block evaluations never run: every token fed after the prompt would cost ``num_layers`` at full
    depth; catch-up and verification count as computed (``Stats.layers_computed``)."""
    stats = generation.stats
    return max(num_layers * stats.steps - stats.layers_computed, 0)


@dataclass
class Done:
    """A generation is over (its tokens came before, as ``TokenTrace`` events)."""

    generation: Generation


@dataclass
class Scored:
    """A scoring job's answer: the prompt's logprobs (echo with ``max_tokens`` 0)."""

    scores: list[tuple[float, TopLogprobs]]


Event = Union["TokenTrace", Done, Scored, ServiceError]
JobState = Literal["queued", "running", "expired"]


@dataclass
class Job:
    """One request in flight. Events arrive on ``events``: token traces, then ``Done`` (or ``Scored``),
    or a ``ServiceError``.

    ``state`` goes from "queued" to "running" (the worker took it) or "expired" (it waited past its
    deadline: the client got a 504, or the worker found it late), once, under the queue's lock
    (``JobQueue``): a job is never both answered 504 and run."""

    prompt_ids: list[int]
    settings: GenerationSettings
    loop: asyncio.AbstractEventLoop
    stats: RequestStats
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_hit: bool = False  # the route found a stop string: cancelling then is a normal finish
    queue_timeout: float | None = None  # seconds it may wait to be admitted (Settings.request_timeout_s)
    expire: Callable[[Job], bool] | None = None  # queued -> expired if still queued (Worker._expire)
    score_top_n: int | None = None  # a scoring job (echo with logprobs): the prompt's logprobs, no generation
    state: JobState = "queued"

    @property
    def deadline(self) -> float | None:
        """When it stops being admissible (monotonic seconds), None without a timeout."""
        return None if self.queue_timeout is None else self.stats.arrival + self.queue_timeout

    def post(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self, stop_hit: bool = False) -> None:
        self.stop_hit = self.stop_hit or stop_hit
        self.cancelled.set()

    async def _next(self) -> Event:
        """The next event; a job still queued at its deadline gets its 504 at once, not when a slot
        frees: unless the worker took it first (then it runs and its events follow)."""
        deadline = self.deadline
        while deadline is not None and self.state == "queued":  # a hint: ``expire`` decides under the lock
            try:
                return await asyncio.wait_for(self.events.get(), timeout=max(deadline - time.monotonic(), 0) + 0.05)
            except asyncio.TimeoutError:
                if self.expire is not None and self.expire(self):
                    raise QueueTimeoutError(f"waited over {self.queue_timeout:g}s in the queue (the request "
                                            "timeout) while the batch was full") from None
        return await self.events.get()

    async def stream(self) -> AsyncIterator[TokenTrace | Done]:
        """A generation's token traces, then ``Done``; raises the job's error if it failed."""
        while True:
            event = await self._next()
            if isinstance(event, ServiceError):
                raise event
            if isinstance(event, Scored):
                raise ServiceError("a scoring job has no token stream")
            yield event
            if isinstance(event, Done):
                return

    async def scores(self) -> list[tuple[float, TopLogprobs]]:
        """A scoring job's answer; raises the job's error if it failed."""
        event = await self._next()
        if isinstance(event, ServiceError):
            raise event
        if not isinstance(event, Scored):
            raise ServiceError("not a scoring job")
        return event.scores


class JobQueue:
    """A bounded FIFO of jobs that a job can leave before its turn (a 504 frees its slot at once),
    and that closes: ``get`` then answers None once it is empty. Jobs change state only here, under
    its lock: ``get`` makes the job it hands out "running" (or "expired", past its deadline),
    ``expire`` makes a still-queued job "expired" and takes it out."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def qsize(self) -> int:
        return len(self._jobs)

    def put_nowait(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise NotReadyError("the server is shutting down")
            if len(self._jobs) >= self.maxsize:
                raise queue.Full
            self._jobs.append(job)
            self._cond.notify()

    def get(self, block: bool = True, now: Callable[[], float] = time.monotonic) -> Job | None:
        """The oldest job, now "running", or "expired" when it is past its deadline; None once closed and
        empty; queue.Empty when not blocking and none waits."""
        with self._cond:
            while not self._jobs and not self._closed:
                if not block:
                    raise queue.Empty
                self._cond.wait()
            if not self._jobs:
                return None
            job = self._jobs.popleft()
            late = job.deadline is not None and now() > job.deadline
            job.state = "expired" if late else "running"
            return job

    def expire(self, job: Job) -> bool:
        """Expire ``job`` and take it out if it is still queued; False when the worker already has it."""
        with self._cond:
            if job.state != "queued":
                return False
            self._jobs.remove(job)
            job.state = "expired"
            return True

    def close(self) -> list[Job]:
        """No more jobs; returns those that were waiting (the caller fails them)."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            for job in waiting:
                job.state = "expired"
            self._cond.notify_all()
            return waiting


class Worker:
    """Loads the model in the background (``ready`` once the decoder exists), then serves the queue's jobs
    in a continuous batch, in its own thread."""

    def __init__(self, settings: Settings, on_fatal: Callable[[str], None] | None = None):
        self.settings = settings
        self.error: str | None = None
        self.decoder: Engine | None = None
        self.metrics: Metrics | None = None
        self.batch_size: Histogram | None = None
        self.exit_policy: ExitPolicy | None = None  # once loaded
        self.prefill_chunk = 64  # prompt tokens per forward pass (Settings.prefill_chunk_tokens; set once loaded)
        self._queue = JobQueue(settings.queue_size)
        self.draining = False  # SIGTERM: new requests get 503, running ones finish
        self._aborting = False  # stop(): the worker cancels what still runs
        self._abort_at: float | None = None  # drain(): when the worker fails what still runs
        self._on_fatal = on_fatal
        self._ready = threading.Event()
        self._running = 0
        self._thread = threading.Thread(target=self._main, name="onejump-engine", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    @property
    def model(self) -> Engine:
        """The loaded decoder (only asked for once ``ready``)."""
        if self.decoder is None:
            raise NotReadyError(self.error or "the model is still loading; try again when /ready answers 200")
        return self.decoder

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Stop admitting (SIGTERM): new requests get 503, and /ready too; queued and running ones go
        on for ``shutdown_timeout_s``, then the worker fails what is left with 503."""
        if not self.draining:
            self.draining = True
            self._abort_at = time.monotonic() + self.settings.shutdown_timeout_s
            log.info("shutting down: no new requests; %d running and %d waiting get %ds to finish", self._running,
                     self._queue.qsize(), self.settings.shutdown_timeout_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what still waits (503), cancel what still runs, and join the worker (blocks: call
        it off the event loop). The lifespan calls it once uvicorn's graceful period is over."""
        self.draining = self._aborting = True
        for job in self._queue.close():
            self._fail(job, NotReadyError("the server is shutting down"), "shutdown")
        self._gauges()
        if self._thread.is_alive() and self._ready.is_set():  # a load in progress is not waited for (a daemon)
            self._thread.join(timeout)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and self.error is None

    # --- requests --------------------------------------------------------------------------------
    def check_admitting(self) -> None:
        """503 while the model loads, after it failed, or once shutdown began."""
        if not self.ready:
            raise NotReadyError(self.error or "the model is still loading; try again when /ready answers 200")
        if self.draining:
            raise NotReadyError("the server is shutting down")

    def submit(self, prompt_ids: list[int], gen_settings: GenerationSettings, score_top_n: int | None = None) -> Job:
        """Queue a generation, or with ``score_top_n`` a scoring of the prompt (one full forward pass).
        The route admits a request (``check_admitting``); its later jobs (one per choice, after its
        scoring) are still queued during a drain, until the queue closes."""
        if not self.ready:
            raise NotReadyError(self.error or "the model is still loading; try again when /ready answers 200")
        if self.draining and self._abort_due():  # a request admitted before the drain, but past its grace period
            raise self._shutdown_error()
        job = Job(prompt_ids, gen_settings, asyncio.get_running_loop(), RequestStats(arrival=time.monotonic()),
                  queue_timeout=self.settings.request_timeout_s, expire=self._expire, score_top_n=score_top_n)
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

    def _expire(self, job: Job) -> bool:
        """The event loop's side of a deadline: a job still queued expires (its client gets the 504) and
        leaves the queue at once, counted as a timeout; False when the worker already took it."""
        if not self._queue.expire(job):
            return False
        job.stats.failure = "timeout"
        if self.metrics is not None:
            self.metrics.record(job.stats)
        self._gauges()
        return True

    def _gauges(self, running: int | None = None) -> None:
        if running is not None:
            self._running = running
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
        self._serve()

    def _load(self) -> None:
        from shortcuts.adapter import resolve_device

        self.decoder, self.exit_policy = load_decoder(self.settings)
        on_gpu = self.settings.device_map is not None or resolve_device(self.settings.device).startswith("cuda")
        self.prefill_chunk = self.settings.prefill_chunk_tokens or (512 if on_gpu else 64)
        self.metrics = Metrics(self.settings.model_name, self.model.num_layers)
        buckets = tuple(float(n) for n in range(1, self.settings.max_batch_size + 1))
        self.batch_size = Histogram("onejump_batch_size", "Sequences decoded together in one token step",
                                    ["model_name"], registry=self.metrics.registry, buckets=buckets)

    def _fail(self, job: Job | None, error: ServiceError, reason: str) -> None:
        if job is None:
            return
        job.stats.failure = reason
        if self.metrics is not None:
            self.metrics.record(job.stats)
        job.post(error)

    # --- the continuous batch --------------------------------------------------------------------
    def _serve(self) -> None:
        """Admit, drop the cancelled, step; until the queue is closed and the batch is empty."""
        batch = self.model.batch(self.settings.max_batch_size)
        running: Running = {}
        stopping = False
        while not (stopping and not running):
            admitted = 0
            if not stopping:
                stopping, admitted = self._admit(batch, running)
            self._abort_if_due(batch, running)
            self._drop_cancelled(batch, running)
            if running:
                self._step(batch, running, decodes=not admitted)
            self._gauges(running=len(running))
            if self.metrics is not None:
                self.metrics.kv_usage.labels(self.metrics.model_name).set(batch.kv_usage())

    def _admit(self, batch: Batch, running: Running) -> tuple[bool, int]:
        """Start queued jobs while there is room (waiting for one when the batch is empty); whether the
        queue is closed and empty, and how many sequences joined the batch."""
        admitted = 0
        while batch.free_slots:
            try:
                job = self._queue.get(block=not running)
            except queue.Empty:
                break
            if job is None:
                return True, admitted
            seq = self._start(job, batch)
            if seq is not None:
                running[id(seq)] = (job, seq)
                admitted += 1
            self._gauges(running=len(running))
        return False, admitted

    def _start(self, job: Job, batch: Batch) -> SequenceHandle | None:
        """Prefill the job's prompt into the batch (its first token comes with the next step); None when
        it expired, was cancelled, failed, or was a scoring job (done at once)."""
        s = job.stats
        s.started = time.monotonic()
        if job.state == "expired":  # the worker took it past its deadline (the queue decided, under its lock)
            self._fail(job, QueueTimeoutError(f"waited {s.started - s.arrival:.1f}s in the queue, longer than "
                                              f"the {self.settings.request_timeout_s:g}s request timeout"), "timeout")
            return None
        if job.cancelled.is_set():  # the client left while it waited
            self._fail(job, ClientGoneError("cancelled"), "cancelled")
            return None
        from shortcuts.errors import Cancelled

        try:
            if job.score_top_n is not None:
                self._score(job)
                return None
            return batch.add(job.prompt_ids, job.settings, stop=lambda: self._halted(job),
                             chunk=self.prefill_chunk)
        except Cancelled:
            self._fail_halted(job)
            return None
        except Exception as e:
            log.exception("generation failed")
            self._fail(job, ServiceError(f"generation failed: {e}"), "error")
            return None

    def _score(self, job: Job) -> None:
        """A scoring job: the full model's logprobs of the prompt, done at once (no slot held)."""
        scores = self.model.score(job.prompt_ids, job.score_top_n or 0, stop=lambda: self._halted(job),
                                  chunk=self.prefill_chunk)
        job.stats.finished, job.stats.finish_reason = time.monotonic(), "length"
        assert self.metrics is not None
        self.metrics.record(job.stats)
        job.post(Scored(scores))

    def _abort_due(self) -> bool:
        """Past the shutdown grace period (or stopping): what still runs must stop."""
        return self._aborting or (self._abort_at is not None and time.monotonic() >= self._abort_at)

    def _halted(self, job: Job) -> bool:
        """Asked between two chunks of a prefill or a scoring: its client left, or the grace period ended."""
        return job.cancelled.is_set() or self._abort_due()

    def _shutdown_error(self) -> NotReadyError:
        return NotReadyError(f"the server is shutting down: the generation was cancelled after the "
                             f"{self.settings.shutdown_timeout_s}s grace period")

    def _fail_halted(self, job: Job) -> None:
        """A prefill or a scoring stopped between two chunks: a 503 at shutdown, else the client left."""
        if job.cancelled.is_set():
            self._fail(job, ClientGoneError("cancelled"), "cancelled")
        else:
            self._fail(job, self._shutdown_error(), "shutdown")

    def _abort_if_due(self, batch: Batch, running: Running) -> None:
        """Past the shutdown grace period: fail what still runs or waits with a 503 (an error frame
        for a stream), so that every client gets an answer before the server exits."""
        if self._abort_at is None or time.monotonic() < self._abort_at:
            return
        error = self._shutdown_error()
        for job in self._queue.close():
            self._fail(job, error, "shutdown")
        for job, seq in running.values():
            batch.cancel(seq)
            self._fail(job, error, "shutdown")
        running.clear()

    def _drop_cancelled(self, batch: Batch, running: Running) -> None:
        """A client that went away (or whose stop string was found) frees its slot before the next step."""
        for key, (job, seq) in list(running.items()):
            if job.cancelled.is_set() or self._aborting:
                batch.cancel(seq)
                del running[key]
                self._finish(job, seq.generation)

    def _step(self, batch: Batch, running: Running, decodes: bool) -> None:
        """Step the batch (``decodes``: a token step, not the report of sequences just admitted); each
        output's tokens go to its job, and a finished one is reported and leaves."""
        if decodes and self.batch_size is not None:
            self.batch_size.labels(self.settings.model_name).observe(len(running))
        try:
            outputs = batch.step()
        except Exception as e:  # the batch's state is unknown: fail every job in it and start clean
            log.exception("generation failed")
            for job, seq in running.values():
                batch.cancel(seq)
                self._fail(job, ServiceError(f"generation failed: {e}"), "error")
            running.clear()
            return
        for out in outputs:
            self._report(running, out)

    def _report(self, running: Running, out: SequenceOutput) -> None:
        job, _ = running[id(out.seq)]
        for trace in out.tokens:
            self._token(job, trace)
        if out.finish is not None:
            del running[id(out.seq)]
            self._finish(job, out.generation)

    def _token(self, job: Job, trace: TokenTrace) -> None:
        now = time.monotonic()
        s = job.stats
        if s.first_token is None:
            s.first_token = now
        s.token_times.append(now)
        s.exit_layers.append(trace.exit_layer)
        s.confidences.append(trace.confidence)
        s.kinds.append(_KIND.get(trace.kind, "full"))
        job.post(trace)

    def _finish(self, job: Job, generation: Generation) -> None:
        s = job.stats
        s.finished = time.monotonic()
        st = generation.stats
        s.layers_computed, s.layers_skipped = st.layers_computed, st.layers_skipped
        s.drafted, s.accepted = dict(st.drafted_by), dict(st.accepted_by)
        s.layers_saved = layers_saved(generation, self.model.num_layers)
        if generation.finish_reason == "abort" and not job.stop_hit:
            s.failure = "cancelled"  # the client went away
        else:
            s.finish_reason = "stop" if job.stop_hit else generation.finish_reason
        assert self.metrics is not None
        self.metrics.record(s)
        job.post(Done(generation))
