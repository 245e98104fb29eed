"""Calibration as a library: the stored exit setting (typed, versioned) and the one resolver that
turns it plus overrides into the ``ExitSettings`` the engine runs.

Everything that reads an artifact's exit setting (the server, ``onejump bench``, ``agreement``,
``calibrate``, ``fit``) goes through ``resolve``, so they all run and report the same setting.
Torch-free at import."""

from shortcuts.calibration.setting import (
    PRECISIONS,
    ModeSetting,
    Overrides,
    PrecisionCalibration,
    Resolved,
    StoredCalibration,
    resolve,
    resolve_modes,
)

__all__ = ["PRECISIONS", "ModeSetting", "Overrides", "PrecisionCalibration", "Resolved", "StoredCalibration",
           "resolve",
           "resolve_modes"]
