"""One resolver: ``onejump bench --json``, ``onejump agreement --json`` and the server's
``/v1/models/{id}`` report the same exit setting (``Resolved.report``) for the same artifact and the
same overrides (flags for the commands, the server's flags/environment), in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support.models import build_tiny, tiny_artifact
from support.server import running_server, tiny_settings

from shortcuts.calibration import ModeSetting, StoredCalibration
from shortcuts.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = {  # flags of the commands -> the server's settings with the same overrides
    "stored": ([], {}),
    "threshold": (["--threshold", "0.7"], {"exit_threshold": 0.7}),
    "first level and stride": (["--min-layer", "2", "--stride", "2"], {"exit_min_layer": 2, "exit_stride": 2}),
    "another gate": (["--gate", "entropy"], {"exit_gate": "entropy"}),
}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama's jump with both modes' settings stored (schema ``extra["exit"]``)."""
    art = tiny_artifact(build_tiny("llama"))
    stored = StoredCalibration().with_setting("none", "approximate", ModeSetting(threshold=0.4, min_layer=1, stride=1))
    stored = stored.with_setting("none", "exact", ModeSetting(threshold=0.6, min_layer=2, stride=1, max_draft=2))
    stored.to_extra(art.extra)
    return art.save(tmp_path_factory.mktemp("same") / "jump.safetensors")


def _command(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", [c if c in ("stored", "threshold") else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_bench_agreement_and_server_report_the_same_setting(case: str, calibrated: Path, tiny_model_dir: Path,
                                                            word_corpus: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    flags, env = CASES[case]
    common = ["--model", str(tiny_model_dir), "--jump", str(calibrated), "--prompts", str(word_corpus),
              "--new-tokens", "3", "--json", *flags]
    bench = _command(["bench", *common, "--max-prompts", "1"], capsys)
    agreement = _command(["agreement", *common, "--max-prompts", "2", "--costs", "flops"], capsys)
    with running_server(tiny_settings(tiny_model_dir, jump=str(calibrated), exit_mode="approximate", **env)) as url:
        card = httpx.get(f"{url}/v1/models/tiny-llama").json()["early_exit"]
    assert bench["setting"] == agreement["setting"] == card["approximate"]
    assert bench["exact_setting"] == agreement["exact"]["setting"] == card["exact"]
    approximate, exact = card["approximate"], card["exact"]
    assert (approximate["mode"], exact["mode"]) == ("approximate", "exact")
    if case == "stored":
        assert (approximate["source"], approximate["threshold"], exact["threshold"], exact["max_draft"]) == (
            "calibration", 0.4, 0.6, 2)
    if case == "threshold":
        assert approximate["threshold"] == exact["threshold"] == 0.7
        assert exact["min_layer"] == 2  # the other fields stay exact mode's own
    if case == "another gate":
        assert (approximate["gate"], approximate["source"], approximate["threshold"]) == ("entropy", "built-in", 0.5)
