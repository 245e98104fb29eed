"""Model and jump loading for the service (runs in the engine's thread, never on the event loop)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.config import Settings

log = logging.getLogger("onejump.service")


def resolve_dtype(settings: Settings, device: str) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def preflight(settings: Settings) -> None:
    """Cheap checks before the server starts: the jump artifact exists, reads, and fits the model's
    configuration (layers and width). The weight fingerprint is checked once the weights load."""
    if not settings.jump:
        return
    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact

    artifact = JumpArtifact.load(settings.jump)
    config = CausalLM.load_config(settings.model)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if (layers, width) != (artifact.num_layers, artifact.config.hidden_size):
        raise ValueError(f"jump artifact {settings.jump} is for {artifact.base_model} (L={artifact.num_layers}, "
                         f"d={artifact.config.hidden_size}), but {settings.model} has L={layers}, d={width}")


def _calibrated(calibration: dict[str, Any], settings: Settings, fallback: float) -> float:
    """The artifact's calibrated threshold (``onejump calibrate``) when it is for the configured gate."""
    if not calibration:
        return fallback
    if calibration.get("gate", "confidence") != settings.exit_gate:
        log.warning("the jump is calibrated for the %s gate, the server uses %s: default threshold %.2f",
                    calibration.get("gate"), settings.exit_gate, fallback)
        return fallback
    return float(calibration["threshold"])


def load_decoder(settings: Settings) -> tuple[Any, float]:
    """The decoder for ``settings`` and the default exit threshold (calibrated when the artifact says)."""
    from shortcuts.adapter import CausalLM, resolve_device
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine import EarlyExitDecoder

    device = resolve_device(settings.device)
    lm = CausalLM.load(settings.model, dtype=resolve_dtype(settings, device), device=device,
                       quantization=settings.quantization)
    jump, threshold = None, 0.9
    if settings.jump:
        artifact = JumpArtifact.load(Path(settings.jump))
        artifact.check_model(lm)
        jump = artifact.jump.to(lm.device)
        threshold = _calibrated(artifact.extra.get("calibration", {}), settings, threshold)
    if settings.exit_threshold is not None:
        threshold = settings.exit_threshold
    log.info("loaded %s on %s (%d layers), jump %s, default threshold %.3f", settings.model, device,
             lm.num_layers, settings.jump or "none (identity)", threshold)
    return EarlyExitDecoder(lm, jump), threshold
