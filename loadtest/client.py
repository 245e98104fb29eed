"""Everything that talks to the server: the target check, the pre-flight, one streamed request, /metrics."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.records import LoadtestError, Record

PREFLIGHT_TIMEOUT_S = 3.0
EXIT_HISTOGRAM = "onejump_exit_layer"


@dataclass
class ServerInfo:
    url: str
    model: str


@dataclass
class Scrape:
    """The cumulative exit-layer buckets (upper bound → count) and the queue gauges from one /metrics read."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    running: float = 0.0
    waiting: float = 0.0


def check_target(url: str, allow_remote: bool) -> None:
    """Refuses anything but http(s) on a loopback address, unless ``allow_remote``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LoadtestError(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, None)}
    except (socket.gaierror, UnicodeError) as e:
        raise LoadtestError(f"cannot resolve {parsed.hostname!r} ({e})") from None
    if not allow_remote and not all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses):
        raise LoadtestError(f"{url} is not a loopback address; pass --allow-remote to load another host")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return response.text[:200].replace("\n", " ")


def preflight(url: str, api_key: str | None) -> ServerInfo:
    """Checks /health, /v1/models and /ready with a short timeout; refuses with the reason."""
    headers = auth_headers(api_key)
    try:
        with httpx.Client(base_url=url, timeout=PREFLIGHT_TIMEOUT_S, headers=headers) as client:
            health = client.get("/health")
            if health.status_code != 200:
                raise LoadtestError(f"{url}/health answered {health.status_code}; is this a onejump server?")
            models = client.get("/v1/models")
            if models.status_code == 401:
                raise LoadtestError(f"{url} needs an API key: pass --api-key or set ONEJUMP_API_KEY")
            ready = client.get("/ready")
            if ready.status_code != 200:
                raise LoadtestError(f"the server at {url} is not ready ({ready.status_code}: {_error_message(ready)})")
            model = str(models.json()["data"][0]["id"])
    except httpx.HTTPError as e:
        raise LoadtestError(f"no onejump server answers at {url} ({type(e).__name__}: {e})") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise LoadtestError(f"{url}/v1/models did not answer a model list; is this a onejump server?") from None
    return ServerInfo(url=url, model=model)


# --- one streamed request ----------------------------------------------------------------------------
def _final_frame(rec: Record, frame: dict[str, Any]) -> None:
    usage, report = frame.get("usage") or {}, frame.get("early_exit") or {}
    rec.tokens = int(usage.get("completion_tokens", 0))
    rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
    rec.exit_layers = [int(x) for x in report.get("exit_layers", [])]
    rec.num_layers = report.get("num_layers")
    rec.layers_computed, rec.layers_skipped = report.get("layers_computed"), report.get("layers_skipped")
    rec.finish_reason = frame["choices"][0].get("finish_reason") if frame.get("choices") else None


def _frame(rec: Record, frame: dict[str, Any], now: float, last: float | None) -> float | None:
    """Reads one SSE frame into ``rec``; returns the time of the last frame that carried text."""
    if "error" in frame:
        rec.outcome, rec.error = "stream_error", str(frame["error"].get("message", frame["error"]))[:200]
        return last
    if "usage" in frame:
        _final_frame(rec, frame)
    choices = frame.get("choices") or [{}]
    if not (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
        return last
    rec.text_frames += 1
    if rec.ttft is None:
        rec.ttft = now
    elif last is not None:
        rec.itl.append(now - last)
    return now


async def _read_stream(response: httpx.Response, rec: Record, start: float) -> None:
    last: float | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        last = _frame(rec, json.loads(data), time.perf_counter() - start, last)
    if rec.outcome == "pending":
        rec.outcome = "ok" if rec.finish_reason is not None else "stream_error"
        rec.error = None if rec.ok else "the stream ended without a final frame"


async def stream_request(client: httpx.AsyncClient, body: dict[str, Any], rec: Record,
                         path: str = "/v1/completions") -> None:
    """POSTs a streamed /v1/completions (or /v1/chat/completions) and fills ``rec``; never raises except on
    cancellation."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            rec.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                rec.outcome, rec.error = "http_error", _error_message(response)
            else:
                await _read_stream(response, rec, start)
    except asyncio.CancelledError:
        rec.outcome = "cancelled"
        raise
    except httpx.TimeoutException as e:
        rec.outcome, rec.error = "timeout", f"{type(e).__name__}: {e}"[:200]
    except (httpx.HTTPError, ValueError) as e:
        rec.outcome, rec.error = "transport_error", f"{type(e).__name__}: {e}"[:200]
    finally:
        rec.e2e = time.perf_counter() - start
        if rec.ttft is None and rec.ok:
            rec.ttft = rec.e2e  # no text at all (every token decoded to nothing)


# --- /metrics ----------------------------------------------------------------------------------------
def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == EXIT_HISTOGRAM + "_bucket":
                le = float(s.labels["le"])
                scrape.buckets[le] = scrape.buckets.get(le, 0.0) + s.value
            elif s.name == EXIT_HISTOGRAM + "_count":
                scrape.count += s.value
            elif s.name == "onejump_num_requests_running":
                scrape.running += s.value
            elif s.name == "onejump_num_requests_waiting":
                scrape.waiting += s.value
    return scrape


async def scrape_metrics(client: httpx.AsyncClient, settle_s: float = 10.0) -> Scrape | None:
    """Reads /metrics once the server is idle (running and waiting both 0, up to ``settle_s``), so that
    requests cancelled a moment ago are in it; None when /metrics cannot be read."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            response = await client.get("/metrics", timeout=PREFLIGHT_TIMEOUT_S)
            response.raise_for_status()
            scrape = parse_metrics(response.text)
        except (httpx.HTTPError, ValueError):
            return None
        if (scrape.running == 0 and scrape.waiting == 0) or time.monotonic() > deadline:
            return scrape
        await asyncio.sleep(0.1)
