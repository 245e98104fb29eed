"""The exit setting an artifact stores, typed and versioned, and the one resolver every reader uses.

Stored in a jump artifact's metadata as ``extra["exit"]``::

    {"schema": 1,
     "by_precision": {"none": {"approximate": {gate, threshold, min_layer, stride, ..., "measured": {...}},
                               "exact": {gate, threshold, min_layer, stride, max_draft, draft, ...}},
                      "int8": {...}}}

One entry per weight precision the setting was measured at (``QUANTIZATIONS``; "none" is the model's
own dtype), one setting per mode. ``measured`` holds what the calibration found (agreement, lower
bound, predicted or timed speed-up, corpus): a report, never read by the resolver.

Artifacts written before the schema (``extra["calibration"]`` for approximate mode and
``extra["calibration_exact"]`` for exact mode) read as precision "none".

``resolve(stored, overrides, num_layers, precision)`` is the only place that decides which setting
runs. Precedence, field by field: overrides (a request's ``early_exit`` over the server's flags and
environment, or a command's flags), then the stored setting of that mode at that precision (else at
"none", reported as measured at "none"), then built-ins. A calibration holds for its gate only: an
override naming another gate drops the stored setting (built-ins fill what the overrides leave).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from shortcuts.engine.settings import (
    DRAFT_POLICIES,
    GATES,
    QUANTIZATIONS,
    DraftPolicy,
    ExitSettings,
    Gate,
    KVPolicy,
    Mode,
    Quantization,
)

SCHEMA = 1
KEY = "exit"
PRECISIONS = QUANTIZATIONS
DENSE: Quantization = "none"  # the model's own dtype: the precision the commands measure and run at
STORED_MODES: tuple[Mode, ...] = ("approximate", "exact")  # the modes a calibration stores a setting for
BUILTIN_THRESHOLD: dict[str, float] = {"confidence": 0.9, "learned": 0.9, "entropy": 0.5, "patience": 0.9}
Source = Literal["calibration", "built-in"]


_INTS = ("min_layer", "stride", "patience", "max_draft", "ngram_min", "ngram_max")
_FIELDS = ("gate", "threshold", *_INTS, "draft")  # what a stored setting gives ExitSettings


@dataclass(frozen=True)
class ModeSetting:
    """One mode's calibrated exit setting (exact mode also: where drafts come from, how many, and the
    n-gram lookup's match lengths)."""

    gate: Gate = "confidence"
    threshold: float = 0.9
    min_layer: int = 1
    stride: int = 1
    patience: int = 2
    max_draft: int = 8
    draft: DraftPolicy = "auto"
    ngram_min: int = 1
    ngram_max: int = 4
    measured: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.gate not in GATES or self.draft not in DRAFT_POLICIES:
            raise ValueError(f"gate={self.gate!r} must be one of {GATES}, draft={self.draft!r} one of {DRAFT_POLICIES}")
        if isinstance(self.threshold, bool) or not math.isfinite(float(self.threshold)):
            raise ValueError(f"threshold={self.threshold!r} must be a finite number")
        for name in _INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"ngram_max={self.ngram_max} must be >= ngram_min={self.ngram_min}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModeSetting:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown exit-setting fields {sorted(unknown)}")
        d = dict(d)
        for name in _INTS:
            if name in d:
                d[name] = int(d[name])
        if "threshold" in d:
            d["threshold"] = float(d["threshold"])
        return cls(**d)


@dataclass(frozen=True)
class PrecisionCalibration:
    """The settings measured at one weight precision, one per mode (None: not calibrated)."""

    approximate: ModeSetting | None = None
    exact: ModeSetting | None = None

    def for_mode(self, mode: Mode) -> ModeSetting | None:
        return self.exact if mode == "exact" else self.approximate if mode == "approximate" else None

    def to_dict(self) -> dict[str, Any]:
        return {m: s.to_dict() for m, s in (("approximate", self.approximate), ("exact", self.exact)) if s is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionCalibration:
        if unknown := set(d) - set(STORED_MODES):
            raise ValueError(f"unknown modes {sorted(unknown)} in a stored calibration")
        return cls(*(ModeSetting.from_dict(d[m]) if m in d else None for m in STORED_MODES))


@dataclass(frozen=True)
class StoredCalibration:
    """Every stored setting of an artifact, by precision."""

    by_precision: dict[str, PrecisionCalibration] = field(default_factory=dict)

    def lookup(self, precision: str) -> tuple[PrecisionCalibration | None, str | None]:
        """The calibration for ``precision`` and the precision it was measured at: its own, else
        "none"'s (a setting measured on the dense model), else (None, None)."""
        for p in (precision, "none"):
            if p in self.by_precision:
                return self.by_precision[p], p
        return None, None

    def with_setting(self, precision: str, mode: Mode, setting: ModeSetting) -> StoredCalibration:
        """A copy with ``mode``'s setting at ``precision`` replaced (what a calibration stores)."""
        if precision not in PRECISIONS or mode not in STORED_MODES:
            raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}, mode approximate or exact")
        cal = self.by_precision.get(precision, PrecisionCalibration())
        return StoredCalibration({**self.by_precision, precision: replace(cal, **{mode: setting})})

    def to_extra(self, extra: dict[str, Any]) -> None:
        """Write into an artifact's ``extra`` (in place); the pre-schema keys are dropped."""
        extra[KEY] = {"schema": SCHEMA, "by_precision": {p: c.to_dict() for p, c in self.by_precision.items()}}
        extra.pop("calibration", None)
        extra.pop("calibration_exact", None)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> StoredCalibration:
        """Read an artifact's ``extra``: the schema, or the keys written before it (precision "none")."""
        if KEY in extra:
            data = extra[KEY]
            schema = data.get("schema") if isinstance(data, dict) else None
            if schema != SCHEMA:
                raise ValueError(f"extra[{KEY!r}] has schema {schema!r}; this release reads schema {SCHEMA}")
            return cls({str(p): PrecisionCalibration.from_dict(c) for p, c in data.get("by_precision", {}).items()})
        approximate = _legacy(extra.get("calibration"), exact=False)
        exact = _legacy(extra.get("calibration_exact"), exact=True)
        if approximate is None and exact is None:
            return cls()
        return cls({"none": PrecisionCalibration(approximate, exact)})


_LEGACY_FIELDS = ("gate", "threshold", "min_layer", "stride", "max_draft")


def _legacy(d: dict[str, Any] | None, exact: bool) -> ModeSetting | None:
    """A pre-schema calibration dict; exact mode's "never draft" (a confidence threshold of 1.0) reads
    as draft "none"."""
    if not d or "threshold" not in d:
        return None
    kept = {k: d[k] for k in _LEGACY_FIELDS if k in d}
    measured = {k: v for k, v in d.items() if k not in _LEGACY_FIELDS and k != "mode"}
    s = ModeSetting.from_dict({**kept, "measured": measured})
    if exact:
        never = s.gate in ("confidence", "learned") and s.threshold >= 1.0
        return replace(s, draft="none" if never else "exit")
    return s


@dataclass(frozen=True)
class Overrides:
    """Exit fields given explicitly (None: not given). ``over`` layers a more specific set on top."""

    mode: Mode | None = None
    gate: Gate | None = None
    threshold: float | None = None
    min_layer: int | None = None
    stride: int | None = None
    patience: int | None = None
    max_draft: int | None = None
    draft: DraftPolicy | None = None
    ngram_min: int | None = None
    ngram_max: int | None = None
    kv_policy: KVPolicy | None = None

    def over(self, base: Overrides) -> Overrides:
        """These overrides on top of ``base`` (a request's over the server's)."""
        return Overrides(**{f.name: getattr(base, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                            for f in fields(self)})

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Resolved:
    """The setting that runs, where its fields came from, and the precision it was measured at."""

    settings: ExitSettings
    source: Source  # the stored setting, or built-ins (overrides aside)
    measured_at: str | None  # the precision of the stored setting used; None for built-ins
    precision: str  # the precision the model runs at
    overridden: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """What bench, agreement and the server print: the fields that run and their provenance."""
        s = self.settings
        return {"mode": s.mode, "gate": s.gate, "threshold": s.threshold, "min_layer": s.min_layer, "stride": s.stride,
                "patience": s.patience, "max_draft": s.max_draft, "draft": s.draft, "ngram_min": s.ngram_min,
                "ngram_max": s.ngram_max, "kv_policy": s.kv_policy,
                "source": self.source, "measured_at": self.measured_at, "precision": self.precision,
                "overridden": list(self.overridden)}


def resolve(stored: StoredCalibration | None, overrides: Overrides, num_layers: int,
            precision: Quantization | str = "none", default_mode: Mode = "approximate") -> Resolved:
    """The exit setting a mode runs with (see the module docstring for the precedence); ValueError
    for fields the engine would refuse, or levels outside a model of ``num_layers`` layers."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    mode: Mode = overrides.mode or default_mode
    cal, measured_at = (stored or StoredCalibration()).lookup(precision)
    base = cal.for_mode(mode) if cal is not None else None
    if base is None and mode == "exact" and cal is not None and cal.approximate is not None:
        base = replace(cal.approximate, draft="auto")  # no exact calibration: auto, exits at approximate's setting
    if base is not None and overrides.gate is not None and overrides.gate != base.gate:
        base = None  # a calibration holds for its gate
    source: Source = "calibration" if base is not None else "built-in"
    if base is None:
        gate = overrides.gate or "confidence"
        base, measured_at = ModeSetting(gate=gate, threshold=BUILTIN_THRESHOLD[gate]), None
    values = {k: getattr(base, k) for k in _FIELDS}
    given = overrides.given()
    values.update({k: v for k, v in given.items() if k != "mode"})
    settings = ExitSettings(mode=mode, **values)
    if mode != "off":
        settings.check_levels(num_layers)
    return Resolved(settings, source, measured_at, str(precision), tuple(sorted(given)))


def resolve_modes(stored: StoredCalibration | None, overrides: Overrides, num_layers: int,
                  precision: Quantization | str = "none") -> dict[Mode, Resolved]:
    """Approximate and exact mode's settings for these overrides, each as a request in that mode runs
    it: what ``/v1/models/{id}``, ``onejump bench`` and ``onejump agreement`` report."""
    return {m: resolve(stored, overrides, num_layers, precision, default_mode=m) for m in STORED_MODES}
