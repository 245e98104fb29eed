"""Model and jump loading for the service (runs in the engine's thread, never on the event loop)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import Settings

if TYPE_CHECKING:
    from shortcuts.engine.api import Engine

log = logging.getLogger("onejump.service")


def resolve_dtype(settings: Settings, device: str) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def check_readable(path: Path, what: str) -> None:
    """A file (or every file of a folder) that exists must be readable by this process: say so
    plainly, rather than the loader's "No such file or directory" or "Permission denied" later."""
    for p in [path, *sorted(path.iterdir())] if path.is_dir() and os.access(path, os.X_OK) else [path]:
        if p.exists() and not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
            st = p.stat()
            raise PermissionError(f"{what} {p} exists but cannot be read: mode {st.st_mode & 0o777:o}, owner uid "
                                  f"{st.st_uid}, the server runs as uid {os.getuid()}; make it readable "
                                  f"(chmod -R a+rX {path})")


def preflight(settings: Settings) -> None:
    """Cheap checks before the model loads: the model and jump files are readable, the jump
    artifact reads and was fitted on a model with this configuration (architecture, layers, width,
    vocabulary, heads: the configuration half of its fingerprint). The weight half of the
    fingerprint is checked once the weights load."""
    model = Path(settings.model)
    if model.exists():
        check_readable(model, "the model")
    if not settings.jump:
        return
    check_readable(Path(settings.jump), "the jump artifact")
    from shortcuts.adapter import CausalLM, config_fingerprint
    from shortcuts.artifact import JumpArtifact

    artifact = JumpArtifact.load(settings.jump)
    config = CausalLM.load_config(settings.model)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if (layers, width) != (artifact.num_layers, artifact.config.hidden_size):
        raise ValueError(f"jump artifact {settings.jump} is for {artifact.base_model} (L={artifact.num_layers}, "
                         f"d={artifact.config.hidden_size}), but {settings.model} has L={layers}, d={width}")
    expected = artifact.fingerprint.get("config_sha256")
    if expected is not None and expected != config_fingerprint(config):
        raise ValueError(f"jump artifact {settings.jump} is for {artifact.base_model}, not {settings.model}: the model "
                         "configuration differs (architecture, vocabulary, MLP width or attention heads)")
    if layers and settings.exit_min_layer is not None and settings.exit_min_layer >= layers:
        raise ValueError(f"exit_min_layer={settings.exit_min_layer} must be in [1, {layers - 1}] for {settings.model}")


@dataclass(frozen=True)
class ExitDefaults:
    """What a request's ``early_exit`` falls back to: flags/env first, then the artifact's
    calibration (gate, threshold, first level, stride) when it is for the gate in use, then
    built-ins. ``exact``: exact mode's own calibration (``extra["calibration_exact"]``: threshold,
    first level, stride, max_draft), used for exact requests unless flags/env set the exit fields."""

    gate: str = "confidence"
    threshold: float = 0.9
    min_layer: int = 1
    stride: int = 1
    source: str = "built-in"
    exact: dict[str, Any] | None = None

    def fields(self, mode: str) -> dict[str, Any]:
        """The exit fields a request in ``mode`` starts from."""
        base = {"gate": self.gate, "threshold": self.threshold, "min_layer": self.min_layer, "stride": self.stride}
        return base | self.exact if mode == "exact" and self.exact is not None else base


def exit_defaults(calibration: dict[str, Any], settings: Settings, num_layers: int,
                  calibration_exact: dict[str, Any] | None = None) -> ExitDefaults:
    from shortcuts.artifact import exact_setting

    gate = settings.exit_gate or str(calibration.get("gate", "confidence"))
    usable = bool(calibration) and calibration.get("gate", "confidence") == gate
    if calibration and not usable:
        log.warning("the jump is calibrated for the %s gate, the server uses %s: calibration ignored",
                    calibration.get("gate"), gate)
    base = ExitDefaults(gate, float(calibration["threshold"]), int(calibration.get("min_layer", 1)),
                        int(calibration.get("stride", 1)), "calibration") if usable else ExitDefaults(gate)
    threshold = base.threshold if settings.exit_threshold is None else settings.exit_threshold
    min_layer = base.min_layer if settings.exit_min_layer is None else settings.exit_min_layer
    stride = base.stride if settings.exit_stride is None else settings.exit_stride
    if not 1 <= min_layer < num_layers:
        raise ValueError(f"exit_min_layer={min_layer} must be in [1, {num_layers - 1}] for {settings.model}")
    overridden = (settings.exit_threshold, settings.exit_min_layer, settings.exit_stride) != (None, None, None)
    own = None if overridden else exact_setting(calibration_exact, gate)
    return ExitDefaults(gate, threshold, min_layer, stride, base.source, own)


def load_decoder(settings: Settings) -> tuple[Engine, ExitDefaults]:
    """The decoder for ``settings`` and the exit defaults (calibrated when the artifact says)."""
    from shortcuts.adapter import CausalLM, resolve_device
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine import EarlyExitDecoder
    from shortcuts.placement import map_main_device

    device_map = settings.device_map_value
    device = resolve_device(settings.device) if device_map is None else map_main_device(device_map)
    lm = CausalLM.load(settings.model, dtype=resolve_dtype(settings, device), device=device,
                       quantization=settings.quantization, device_map=device_map)
    jump, calibration, learned, exact = None, {}, None, None
    if settings.jump:
        artifact = JumpArtifact.load(Path(settings.jump))
        artifact.check_model(lm)
        jump = artifact.jump.to(lm.device)
        calibration = artifact.extra.get("calibration", {})
        exact = artifact.extra.get("calibration_exact")  # exact mode's own setting
        if "gate" in artifact.extra:
            from shortcuts.engine.learned_gate import LearnedGate

            learned = LearnedGate.from_dict(artifact.extra["gate"])
    defaults = exit_defaults(calibration, settings, lm.num_layers, exact)
    if defaults.gate == "learned" and learned is None:
        raise ValueError(f"exit_gate=learned, but {settings.jump or 'no jump artifact'} holds no learned gate")
    log.info("loaded %s on %s (%d layers), jump %s, exit defaults %s", settings.model, lm.placement().describe(),
             lm.num_layers, settings.jump or "none (identity)", defaults)
    decoder = EarlyExitDecoder(lm, jump, max_seq_len=settings.max_prompt_tokens + settings.max_new_tokens,
                               compile=settings.compile, learned_gate=learned)
    if settings.compile:
        log.info("compiled the decoder blocks in %.1fs", decoder.compile_seconds)
    return decoder, defaults
