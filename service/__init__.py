"""onejump's HTTP service: OpenAI-compatible endpoints over the early-exit engine (`python -m service`)."""
