"""Model and jump loading for the service (runs in the engine's thread, never on the event loop), and
the exit policy: ``calibration.resolve`` of a request's ``early_exit`` over the server's flags over the
artifact's stored setting. Torch and the engine are imported inside the functions that load them, so
importing the service (and ``python -m service --help``) stays light."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import Settings
from shortcuts.calibration import Overrides, Resolved, StoredCalibration, resolve, resolve_modes
from shortcuts.engine.settings import DEFAULT_MODE, Mode

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
class ExitPolicy:
    """Which exit setting a request runs: ``calibration.resolve`` of the request's ``early_exit`` over the
    server's flags and environment, over the artifact's stored setting (for the precision the model runs
    at), over built-ins. ``default_mode``: a request that names no mode runs this one."""

    stored: StoredCalibration
    overrides: Overrides  # the server's flags and environment
    num_layers: int
    precision: str = "none"
    default_mode: Mode = DEFAULT_MODE

    def resolve(self, request: Overrides | None = None) -> Resolved:
        """The setting a request with these ``early_exit`` fields runs (ValueError: the engine would refuse it)."""
        given = self.overrides if request is None else request.over(self.overrides)
        return resolve(self.stored, given, self.num_layers, self.precision, self.default_mode)

    def report(self) -> dict[str, dict[str, Any]]:
        """Both modes' defaults as ``/v1/models/{id}``, ``onejump bench`` and ``agreement`` report them."""
        return {m: r.report() for m, r in resolve_modes(self.stored, self.overrides, self.num_layers,
                                                          self.precision).items()}


def exit_policy(extra: dict[str, Any], settings: Settings, num_layers: int) -> ExitPolicy:
    """The server's exit policy for an artifact's ``extra`` (empty without one)."""
    overrides = Overrides(gate=settings.exit_gate, threshold=settings.exit_threshold,
                          min_layer=settings.exit_min_layer, stride=settings.exit_stride, draft=settings.exit_draft,
                          max_draft=settings.exit_max_draft)
    return ExitPolicy(StoredCalibration.from_extra(extra), overrides, num_layers, settings.quantization,
                      settings.exit_mode)


def load_decoder(settings: Settings) -> tuple[Engine, ExitPolicy]:
    """The decoder for ``settings`` and its exit policy (the artifact's calibration when it has one)."""
    from shortcuts.adapter import CausalLM, resolve_device
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine.decoder import EarlyExitDecoder
    from shortcuts.engine.learned_gate import LearnedGate
    from shortcuts.placement import map_main_device

    device_map = settings.device_map_value
    device = resolve_device(settings.device) if device_map is None else map_main_device(device_map)
    lm = CausalLM.load(settings.model, dtype=resolve_dtype(settings, device), device=device, device_map=device_map)
    jump, extra = None, {}
    if settings.jump:
        artifact = JumpArtifact.load(Path(settings.jump))
        artifact.check_model(lm)
        jump, extra = artifact.jump.to(lm.device), artifact.extra
    learned = LearnedGate.from_extra(extra)
    policy = exit_policy(extra, settings, lm.num_layers)
    defaults = policy.report()  # ValueError when a mode's default cannot run (a first level outside the model)
    if policy.stored.by_precision and any(r["source"] == "built-in" for r in defaults.values()):
        log.warning("the jump's calibration is for another gate than %s: built-in defaults", settings.exit_gate)
    if learned is None and any(r["gate"] == "learned" for r in defaults.values()):
        raise ValueError(f"exit_gate=learned, but {settings.jump or 'no jump artifact'} holds no learned gate")
    log.info("loaded %s on %s (%d layers), jump %s, exit defaults %s", settings.model, lm.placement().describe(),
             lm.num_layers, settings.jump or "none (identity)", defaults)
    decoder = EarlyExitDecoder(lm, jump, max_seq_len=settings.max_prompt_tokens + settings.max_new_tokens,
                               compile=settings.compile, learned_gate=learned, quantization=settings.quantization,
                               bnb_4bit_type=settings.bnb_4bit_type, release=True)
    if settings.compile:
        log.info("compiled the decoder blocks in %.1fs", decoder.compile_seconds)
    log.info("weights: %s", decoder.weights_report())
    log.info("step costs of exact mode's draft policy: %s", decoder.step_costs.as_dict())  # timed now, not later
    return decoder, policy
