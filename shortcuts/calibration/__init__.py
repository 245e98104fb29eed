"""Calibration as a library: the stored exit setting (typed, versioned) and the one resolver that
turns it plus overrides into the ``ExitSettings`` the engine runs.

Everything that reads an artifact's exit setting (the server, ``onejump bench``, ``agreement``,
``calibrate``, ``fit``) goes through ``resolve``, so they all run and report the same setting.
Torch-free at import: the package exports the setting and the resolver; the calibration itself lives
in its modules, imported where they are used:

- ``table``: teacher-forced level tables (what every exit level would decide at every decode step);
- ``replay``: a setting replayed on a table (exit levels, picks, checks paid), the oracle ceilings,
  the bootstrap bound, the learned gate's fit and replay;
- ``costs``: the cost model in blocks and its measurement on the machine at hand;
- ``search``: approximate mode's search (``search``, ``calibrate``); ``exact``: exact mode's;
  ``drafts``: exact mode's draft policy, chosen by timing;
- ``calibrate``, ``agreement``: the ``onejump calibrate`` and ``onejump agreement`` commands
  (``config``: their options), and ``calibrate.store``: what a calibration writes into an artifact."""

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
           "resolve", "resolve_modes"]
