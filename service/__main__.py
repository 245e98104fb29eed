"""``python -m service [--flags]``: check the settings, the port and the files, then serve with uvicorn.

Everything cheap is checked before the model loads (seconds to minutes): the settings, that the port
is free (the socket is bound here and handed to uvicorn, so it stays ours), that the model and jump
files are readable and fit. On SIGTERM (or Ctrl-C) the server stops admitting (503), lets running
generations finish for up to ``shutdown_timeout_s``, cancels the rest, then exits."""

from __future__ import annotations

import logging
import socket
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.config import describe_error, parse_args
from service.loading import preflight


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
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key (ONEJUMP_API_KEY)", settings.host)
    server: uvicorn.Server | None = None
    failures: list[str] = []

    def fatal(message: str) -> None:  # the engine thread could not load the model or the jump
        failures.append(message)
        print(f"onejump: cannot start: {message}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.engine.drain()  # new requests get 503 at once; uvicorn waits for the running ones
            super().handle_exit(sig, frame)

    # the engine fails what still runs at shutdown_timeout_s (each client gets a 503 or an error frame);
    # uvicorn cancels the request tasks a little later, should any hang
    config = uvicorn.Config(app, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s + 5)
    server = Server(config)
    server.run(sockets=[sock])
    return 1 if failures or not server.started else 0


if __name__ == "__main__":
    sys.exit(main())
