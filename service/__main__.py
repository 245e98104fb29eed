"""``python -m service [--flags]``: check the settings, the port and the files, then serve with uvicorn.

Everything cheap is checked before the model loads (seconds to minutes): the settings, that the port
is free (the socket is bound here and handed to uvicorn, so it stays ours), that the model and jump
files are readable and fit. On SIGTERM (or Ctrl-C) the server drains: it keeps listening, answers
every new request 503 (``/ready`` too; ``/health`` and ``/metrics`` 200), lets running requests finish
for up to ``shutdown_timeout_s``, cancels the rest (503, or an error frame for a stream), and exits
once no request is left. A second Ctrl-C (SIGINT) exits at once; a repeated SIGTERM changes nothing."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import NoReturn

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.config import describe_error, parse_args
from service.loading import preflight

LAST_CHUNK_S = 5  # after the grace period, how long a prefill or scoring chunk in progress may take to end


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use stops start-up before the model loads."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT leftovers are fine
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening makes it ours: with SO_REUSEADDR a second bind succeeds until then
    except OSError as e:
        sock.close()
        reason = "is already in use" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
        raise OSError(f"port {port} on {host} {reason}; choose another with --port or ONEJUMP_PORT") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except ValidationError as e:
        print(f"onejump: invalid settings:\n{describe_error(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind(settings.host, settings.port)
        preflight(settings)
    except (ValueError, OSError) as e:
        print(f"onejump: cannot start: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger("onejump.service")
    log.info("listening on http://%s:%d (the model loads next; /ready says when it serves)", settings.host,
             sock.getsockname()[1])
    if settings.api_key is None and settings.allow_unauthenticated:
        log.warning("listening on %s without an API key (ONEJUMP_ALLOW_UNAUTHENTICATED=true)", settings.host)
    server: uvicorn.Server | None = None
    failures: list[str] = []

    def fatal(message: str) -> None:  # the engine thread could not load the model or the jump
        failures.append(message)
        print(f"onejump: cannot start: {message}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal)

    engine = app.state.engine

    class Server(uvicorn.Server):
        """SIGTERM drains instead of closing the socket; the server exits once no request is left."""

        drained_by: float | None = None  # when the drain gives up waiting (past the engine's grace period)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.started or (engine.draining and sig == signal.SIGINT):  # starting, or Ctrl-C twice: now
                super().handle_exit(sig, frame)
                return
            if engine.draining:  # a repeated SIGTERM does not cut the drain short
                return
            engine.drain()  # new requests get 503 at once; running ones finish or are cancelled at the deadline
            self.drained_by = time.monotonic() + settings.shutdown_timeout_s + LAST_CHUNK_S

        async def on_tick(self, counter: int) -> bool:
            if self.drained_by is not None and not self.should_exit:
                late = time.monotonic() > self.drained_by
                if not self.server_state.tasks or late:  # no request left (or they outstay the deadline)
                    self.should_exit = True
            return await super().on_tick(counter)

    # the engine fails what still runs at shutdown_timeout_s (each client gets a 503 or an error frame), the
    # drain ends when no request is left; uvicorn cancels request tasks that still hang 2 s after that
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=2)
    server = Server(config)
    server.run(sockets=[sock])
    return 1 if failures or not server.started else 0


def run(argv: list[str] | None = None) -> NoReturn:
    """``main``, then exit at once: the logs flushed, without tearing the interpreter down (with torch loaded
    that takes seconds, which count against the orchestrator's grace period)."""
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
