"""Shared test helpers for the service: a real uvicorn server on a free loopback port, in a thread, the
tiny model's settings, an ``openai`` client and the metrics it exposes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from shortcuts.engine.batch import BatchDecoder
from shortcuts.engine.sequence import SequenceOutput


@contextmanager
def running_server(settings: Settings, wait_ready: bool = True, timeout: float = 120.0) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) of a server started with ``settings``."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        if wait_ready:
            headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
            while httpx.get(f"{url}/ready", headers=headers).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the test server never became ready: {app.state.engine.error}")
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def tiny_settings(folder: Path, **kw) -> Settings:
    base = {"model": str(folder), "jump": "", "device": "cpu", "exit_mode": "off", "default_max_tokens": 8,
            "served_model_aliases": "m"}
    return Settings(**(base | kw))


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {f"{s.name}{json.dumps(s.labels, sort_keys=True)}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, **labels: str) -> float:
    return sum(v for k, v in metrics(url).items()
               if k.startswith(name + "{") and all(f'"{a}": "{b}"' in k for a, b in labels.items()))


ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error(r: httpx.Response, status: int) -> dict:
    """The one error body: {"error": {"message", "type", "param", "code"}} with the HTTP status as code."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == status
    assert body["error"]["message"]
    return body["error"]


def post(url: str, body: object, path: str = "/v1/completions", headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"} | (headers or {}),
                      timeout=60)


class StepGate:
    """Holds the in-process servers' token steps until ``open``: a generation that has started holds its
    batch slot for as long as a test needs, with no sleeps to order things. ``entered`` is set once a
    step is waiting (a sequence is in the batch)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        step = BatchDecoder.step

        def gated(batch: BatchDecoder) -> list[SequenceOutput]:
            self.entered.set()
            if not self.go.wait(120):
                raise RuntimeError("the test never opened the step gate")
            return step(batch)

        monkeypatch.setattr(BatchDecoder, "step", gated)

    def wait_entered(self) -> None:
        assert self.entered.wait(60), "no generation reached a step"

    def open(self) -> None:
        self.go.set()
