"""A real uvicorn server on a free loopback port, in a thread, for the HTTP tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from service.app import create_app
from service.config import Settings


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
