"""``python -m service [--flags]``: check the settings and the jump, then serve with uvicorn."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    from service.config import parse_args

    try:
        settings = parse_args(argv)
    except ValidationError as e:
        print(f"onejump: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from service.app import create_app
    from service.loading import preflight

    try:
        preflight(settings)
    except (ValueError, OSError) as e:
        print(f"onejump: cannot start: {e}", file=sys.stderr)
        return 2
    server: uvicorn.Server | None = None
    failures: list[str] = []

    def fatal(message: str) -> None:  # the engine thread could not load the model or the jump
        failures.append(message)
        print(f"onejump: cannot start: {message}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    config = uvicorn.Config(create_app(settings, on_fatal=fatal), host=settings.host, port=settings.port,
                            log_level=settings.log_level)
    server = uvicorn.Server(config)
    server.run()
    return 1 if failures or not server.started else 0


if __name__ == "__main__":
    sys.exit(main())
