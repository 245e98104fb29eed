"""The load generator against a real server on a tiny model, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_utils import running_server
from test_service import tiny_settings

from loadtest.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_closed_loop_interleaves_modes(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the city", "a war film", "the old king"]))
    out = tmp_path / "lt.json"
    with running_server(tiny_settings(tiny_folder)) as url:
        assert main(["--url", url, "--concurrency", "1", "2", "--requests", "3", "--max-tokens", "4",
                     "--prompts", str(prompts), "--out", str(out), "--modes", "off", "approximate"]) == 0
    table = json.loads(out.read_text())["table"]
    assert [(r["concurrency"], r["mode"]) for r in table] == [(1, "off"), (1, "approximate"), (2, "off"),
                                                              (2, "approximate")]
    assert all(r["requests"] == 3 and r["errors"] == 0 for r in table)
    assert all(r["mean_exit_layer"] == 4 for r in table if r["mode"] == "off")
    assert "| concurrency | mode |" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://10.1.2.3:8000"], "not a loopback address"),
    (["--url", "http://127.0.0.1:9"], "no onejump server answers"),
    (["--concurrency", "0"], "must be positive"),
])
def test_refusals(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(args)
