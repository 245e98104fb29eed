"""The early-exit decoding engine: a layer-by-layer runner with a per-layer KV cache, and a
decoder that leaves the forward pass early when a low-rank jump is confident.

    from shortcuts.engine import EarlyExitDecoder, ExitSettings, GenerationSettings
    dec = EarlyExitDecoder(lm, JumpArtifact.load(path).jump)
    gen = dec.generate(prompt_ids, GenerationSettings(max_new_tokens=64, exit=ExitSettings(mode="exact")))

Settings import without torch; the decoder and runner load on first use.
"""

from __future__ import annotations

from typing import Any

from shortcuts.engine.settings import ExitSettings, GenerationSettings

_LAZY = {
    "EarlyExitDecoder": "shortcuts.engine.decoder",
    "Generation": "shortcuts.engine.decoder",
    "TokenTrace": "shortcuts.engine.decoder",
    "Stats": "shortcuts.engine.decoder",
    "LayerRunner": "shortcuts.engine.runner",
    "KVCache": "shortcuts.engine.cache",
    "ExitHead": "shortcuts.engine.exit_head",
    "BatchDecoder": "shortcuts.engine.batch",
}

__all__ = ["ExitSettings", "GenerationSettings", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shortcuts.engine' has no attribute {name!r}")
