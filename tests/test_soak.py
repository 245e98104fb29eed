"""The soak script (``python -m loadtest.soak``, not run in CI at length) for a few seconds against the
tiny server: its checks of /metrics against the responses pass, and it samples memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.server import running_server, tiny_settings

from loadtest.soak import main, slope_per_min

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_slope() -> None:
    assert slope_per_min([(0, 100), (30, 101), (60, 102)]) == pytest.approx(2.0)
    assert slope_per_min([(0, 1)]) is None


@pytest.mark.slow
def test_a_short_soak_passes(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king of the\nthe city\na new song of the north\n")
    with running_server(tiny_settings(tiny_folder, max_new_tokens=16)) as url:
        code = main(["--url", url, "--duration", "3", "--concurrency", "2", "--max-tokens", "6",
                     "--pid", str(os.getpid()), "--sample-every", "0.5", "--prompts", str(prompts),
                     "--max-growth-mib-per-min", "1000", "--out-dir", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "soak.json").read_text())
    assert code == 0, capsys.readouterr().out
    assert summary["requests"] > 3
    assert all(c["ok"] for c in summary["checks"]), summary["checks"]
    assert summary["memory"]["max_mib"] > 10
    assert len(summary["samples"]) >= 4
    assert "PASS" in (tmp_path / "out" / "soak.md").read_text()
