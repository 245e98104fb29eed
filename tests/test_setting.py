"""The stored exit setting (schema, legacy artifacts) and the one resolver every reader uses."""

import pytest

from shortcuts.calibration import ModeSetting, Overrides, PrecisionCalibration, StoredCalibration, resolve

LEGACY = {"calibration": {"gate": "confidence", "threshold": 0.48, "min_layer": 25, "stride": 3, "agreement": 0.95},
          "calibration_exact": {"mode": "exact", "gate": "confidence", "threshold": 1.0, "min_layer": 1, "stride": 1,
                                "max_draft": 1, "predicted_speedup": 1.0}}


def test_legacy_artifact_reads_as_precision_none():
    stored = StoredCalibration.from_extra(LEGACY)
    cal, at = stored.lookup("int8")
    assert at == "none"
    assert cal is not None
    assert cal.approximate is not None
    assert cal.exact is not None
    assert (cal.approximate.threshold, cal.approximate.min_layer, cal.approximate.stride) == (0.48, 25, 3)
    assert cal.approximate.measured == {"agreement": 0.95}
    assert cal.exact.draft == "none"  # never drafting, said by name


def test_schema_round_trip_drops_legacy_keys():
    stored = StoredCalibration.from_extra(LEGACY).with_setting(
        "int8", "approximate", ModeSetting(threshold=0.6, min_layer=20, stride=2))
    extra = dict(LEGACY)
    stored.to_extra(extra)
    assert "calibration" not in extra
    assert "calibration_exact" not in extra
    again = StoredCalibration.from_extra(extra)
    assert again == stored
    assert again.lookup("int8")[0].approximate.threshold == 0.6
    assert again.lookup("int4")[1] == "none"


def test_future_schema_is_refused():
    with pytest.raises(ValueError, match="schema"):
        StoredCalibration.from_extra({"exit": {"schema": 99}})


def test_resolve_precedence_and_provenance():
    stored = StoredCalibration.from_extra(LEGACY)
    r = resolve(stored, Overrides(), num_layers=30)
    assert (r.settings.mode, r.settings.threshold, r.settings.min_layer, r.source) == ("approximate", 0.48, 25,
                                                                                         "calibration")
    exact = resolve(stored, Overrides(mode="exact"), num_layers=30)
    assert (exact.settings.draft, exact.settings.max_draft) == ("none", 1)
    field_wise = resolve(stored, Overrides(threshold=0.7).over(Overrides(stride=1)), num_layers=30)
    assert (field_wise.settings.threshold, field_wise.settings.stride, field_wise.settings.min_layer) == (0.7, 1, 25)
    assert field_wise.overridden == ("stride", "threshold")
    other_gate = resolve(stored, Overrides(gate="entropy"), num_layers=30)
    assert other_gate.source == "built-in"
    assert other_gate.settings.min_layer == 1
    assert other_gate.report()["measured_at"] is None


def _extra(stored: StoredCalibration) -> dict:
    extra: dict = {}
    stored.to_extra(extra)
    return extra


def test_resolve_falls_back_and_checks_levels():
    assert resolve(None, Overrides(), 30).source == "built-in"
    only_approx = StoredCalibration({"none": PrecisionCalibration(ModeSetting(threshold=0.5, min_layer=4))})
    exact = resolve(only_approx, Overrides(mode="exact"), 30)
    assert (exact.settings.threshold, exact.settings.min_layer, exact.settings.draft) == (0.5, 4, "auto")
    builtin = resolve(None, Overrides(mode="exact"), 30).settings  # exact mode drafts with auto by default
    assert (builtin.draft, builtin.max_draft, builtin.ngram_min, builtin.ngram_max) == ("auto", 8, 1, 4)
    given = resolve(None, Overrides(mode="exact", draft="ngram", ngram_min=2, ngram_max=3), 30)
    assert (given.settings.draft, given.settings.ngram_min, given.report()["ngram_max"]) == ("ngram", 2, 3)
    stored = StoredCalibration().with_setting("none", "exact", ModeSetting(draft="ngram", ngram_min=2, max_draft=6))
    again = StoredCalibration.from_extra(_extra(stored))
    assert resolve(again, Overrides(mode="exact"), 30).settings.ngram_min == 2
    with pytest.raises(ValueError, match="ngram_max"):
        ModeSetting(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="min_layer"):
        resolve(only_approx, Overrides(), num_layers=4)
    with pytest.raises(ValueError, match="precision"):
        resolve(None, Overrides(), 30, precision="fp8")
