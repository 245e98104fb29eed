"""The plain data the load tester passes around: arms, load points, jobs and per-request records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Loop = Literal["closed", "open"]
Outcome = Literal["pending", "ok", "http_error", "stream_error", "transport_error", "timeout", "cancelled"]
ERROR_OUTCOMES = ("http_error", "stream_error", "transport_error", "timeout")


Prompt = str | list[dict[str, str]]  # a completion prompt, or a chat request's messages

@dataclass(frozen=True)
class Arm:
    """One setting of the request's ``early_exit`` object; arms are interleaved request by request."""

    mode: str  # off | approximate | exact
    threshold: float | None = None  # None: the server's default
    gate: str | None = None  # None: the server's default

    @property
    def label(self) -> str:
        if self.mode == "off" or self.threshold is None:
            return self.mode
        return f"{self.mode}@{self.threshold:g}"

    def early_exit(self) -> dict[str, Any]:
        body: dict[str, Any] = {"mode": self.mode}
        if self.mode != "off":
            if self.gate is not None:
                body["gate"] = self.gate
            if self.threshold is not None:
                body["threshold"] = self.threshold
        return body


@dataclass(frozen=True)
class LoadPoint:
    """Closed loop: ``value`` concurrent clients. Open loop: Poisson arrivals at ``value`` requests/s."""

    loop: Loop
    value: float

    @property
    def label(self) -> str:
        return f"concurrency {self.value:g}" if self.loop == "closed" else f"rate {self.value:g}/s"


@dataclass(frozen=True)
class Job:
    index: int  # position in the load point's schedule
    arm: Arm
    prompt_index: int
    prompt: Prompt


@dataclass
class Record:
    """What one request did, as the client saw it. Times are seconds; ``sent`` is from the load point's start."""

    index: int
    arm: str
    mode: str
    threshold: float | None
    prompt_index: int
    sent: float = 0.0
    outcome: Outcome = "pending"
    status: int | None = None  # HTTP status, None when no response came
    error: str | None = None
    ttft: float | None = None  # first SSE frame with text
    e2e: float | None = None  # send to the final frame (or to the failure)
    itl: list[float] = field(default_factory=list)  # gaps between frames with text
    text_frames: int = 0
    tokens: int = 0  # completion tokens from the final frame's usage
    prompt_tokens: int = 0
    finish_reason: str | None = None
    exit_layers: list[int] = field(default_factory=list)
    num_layers: int | None = None
    layers_computed: int | None = None
    layers_skipped: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def failed(self) -> bool:
        return self.outcome in ERROR_OUTCOMES


class LoadtestError(Exception):
    """Bad input or an unusable target: ``python -m loadtest`` prints the message and exits with 2."""
