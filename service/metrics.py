"""Prometheus metrics, in two steps as vLLM does: the engine fills ``RequestStats``, and
``Metrics.record`` turns one finished request into metric updates. Names follow vLLM's, with
the ``onejump_`` namespace, units in the names, explicit buckets and a ``model_name`` label.
No ``_created`` series; every labelled series exists (at zero) from the start; the process, platform
and build-info collectors sit beside the engine's metrics."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from shortcuts.engine.settings import DRAFT_SOURCES

FINISH_REASONS = ("stop", "length", "abort")
FAILURE_REASONS = ("queue_full", "timeout", "cancelled", "error", "shutdown")
EXIT_KINDS = ("early", "full", "verified")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


@dataclass
class RequestStats:
    """What one request did; filled by the engine, read once by ``Metrics.record``."""

    arrival: float
    started: float | None = None  # left the queue
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # early | full | verified, per generated token
    layers_computed: int = 0
    layers_skipped: int = 0
    layers_saved: int = 0  # L x tokens fed - layers_computed: block evaluations never run
    drafted: dict[str, int] = field(default_factory=dict)  # exact mode, by source: tokens drafted, and those the
    accepted: dict[str, int] = field(default_factory=dict)  # full model accepted
    finish_reason: str | None = None  # stop | length | abort
    failure: str | None = None  # timeout | cancelled | error | ...


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self, model_name: str, num_layers: int, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # process-wide: no <counter>_created series
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.model_name = model_name
        m, reg, lbl = "onejump_", self.registry, ["model_name"]
        self.ttft = Histogram(m + "time_to_first_token_seconds", "Time to first token", lbl, registry=reg,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram(m + "inter_token_latency_seconds", "Time between generated tokens", lbl, registry=reg,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(m + "e2e_request_latency_seconds", "Arrival to last token", lbl, registry=reg,
                             buckets=LATENCY_BUCKETS)
        self.queue = Histogram(m + "request_queue_time_seconds", "Time waiting in the queue", lbl, registry=reg,
                               buckets=QUEUE_BUCKETS)
        self.prompt_tokens = Counter(m + "prompt_tokens", "Prompt tokens processed", lbl, registry=reg)
        self.generation_tokens = Counter(m + "generation_tokens", "Tokens generated", lbl, registry=reg)
        self.success = Counter(m + "request_success", "Finished requests", [*lbl, "finished_reason"], registry=reg)
        self.failure = Counter(m + "request_failure", "Failed requests", [*lbl, "reason"], registry=reg)
        self.running = Gauge(m + "num_requests_running", "Requests being decoded", lbl, registry=reg)
        self.waiting = Gauge(m + "num_requests_waiting", "Requests in the queue", lbl, registry=reg)
        self.exit_layer = Histogram(m + "exit_layer", "Depth at which each generated token was decided", lbl,
                                    registry=reg, buckets=tuple(float(i) for i in range(1, num_layers + 1)))
        self.exit_confidence = Histogram(m + "exit_confidence", "Confidence of the head that decided each token",
                                         lbl, registry=reg, buckets=CONFIDENCE_BUCKETS)
        self.layers_computed = Counter(m + "layers_computed", "Decoder-layer evaluations (token x layer), catch-up "
                                       "and verification included", lbl, registry=reg)
        self.layers_skipped = Counter(m + "layers_skipped", "Decoder-layer evaluations a generated token did not "
                                      "run in its own step because it exited; catch-up (and exact mode's "
                                      "verification) may run them later, so this is not work saved: see "
                                      "onejump_layers_saved_total", lbl, registry=reg)
        self.layers_saved = Counter(m + "layers_saved", "Decoder-layer evaluations never run: layers x tokens fed "
                                    "minus onejump_layers_computed_total (the work early exits really saved)", lbl,
                                    registry=reg)
        self.tokens = Counter(m + "tokens", "Generated tokens by how they were decided", [*lbl, "exit"],
                              registry=reg)
        self.drafted = Counter(m + "spec_decode_num_draft_tokens", "Exact mode: drafted tokens, by source (ngram: "
                               "prompt lookup, exit: the exit head)", [*lbl, "source"], registry=reg)
        self.accepted = Counter(m + "spec_decode_num_accepted_tokens", "Exact mode: drafted tokens the full "
                                "model accepted, by source", [*lbl, "source"], registry=reg)
        self.kv_usage = Gauge(m + "kv_cache_usage_perc", "Fraction of the batch's static KV cache holding keys "
                              "(1 = full)", lbl, registry=reg)
        self.build = Gauge(m + "build_info", "Versions of this server (value 1)", ["version", "torch",
                           "transformers", "python"], registry=reg)
        self.build.labels(_version("onejump"), _version("torch"), _version("transformers"),
                          platform.python_version()).set(1)
        self._zeros(model_name)

    def _zeros(self, name: str) -> None:
        """Every series at zero from the start, so a rate() or an absent() works before the first event."""
        for metric in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens,
                       self.running, self.waiting, self.exit_layer, self.exit_confidence, self.layers_computed,
                       self.layers_skipped, self.layers_saved, self.kv_usage):
            metric.labels(name)
        for source in DRAFT_SOURCES:
            self.drafted.labels(name, source)
            self.accepted.labels(name, source)
        for reason in FINISH_REASONS:
            self.success.labels(name, reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(name, reason)
        for kind in EXIT_KINDS:
            self.tokens.labels(name, kind)

    def record(self, s: RequestStats) -> None:
        name = self.model_name
        if s.started is not None:
            self.queue.labels(name).observe(s.started - s.arrival)
        if s.first_token is not None:
            self.ttft.labels(name).observe(s.first_token - s.arrival)
        for a, b in zip(s.token_times, s.token_times[1:], strict=False):
            self.itl.labels(name).observe(b - a)
        self.prompt_tokens.labels(name).inc(s.prompt_tokens)
        self.generation_tokens.labels(name).inc(len(s.exit_layers))
        for layer, conf, kind in zip(s.exit_layers, s.confidences, s.kinds, strict=True):
            self.exit_layer.labels(name).observe(layer)
            self.exit_confidence.labels(name).observe(conf)
            self.tokens.labels(name, kind).inc()
        self.layers_computed.labels(name).inc(s.layers_computed)
        self.layers_skipped.labels(name).inc(s.layers_skipped)
        self.layers_saved.labels(name).inc(s.layers_saved)
        for source, n in s.drafted.items():
            self.drafted.labels(name, source).inc(n)
        for source, n in s.accepted.items():
            self.accepted.labels(name, source).inc(n)
        if s.failure is not None:
            self.failure.labels(name, s.failure).inc()
            return
        if s.finished is not None:
            self.e2e.labels(name).observe(s.finished - s.arrival)
        self.success.labels(name, s.finish_reason or "stop").inc()
