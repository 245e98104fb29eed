"""The load tester against a real server on a tiny model (closed and open loop, the duration bound, the
/metrics consistency check, the outputs), and its one-line refusals of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.server import running_server

from loadtest.__main__ import main
from service.config import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_LAYERS = 4
PNGS = ("latency_vs_load.png", "tokens_vs_threshold.png", "exit_depth.png")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    texts = ["the city", "a war film", "the old king", "the river and the sea", "a new school"]
    path.write_text("".join(json.dumps({"text": t, "title": "x"}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[str]:
    from support.models import build_tiny

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    lm = build_tiny("llama", layers=TINY_LAYERS)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    settings = Settings(model=str(folder), jump="", device="cpu", exit_mode="off", queue_size=64)
    with running_server(settings) as base:
        yield base


def run_ok(url: str, prompts: Path, out: Path, *args: str) -> dict[str, Any]:
    argv = ["--url", url, "--prompts", str(prompts), "--out-dir", str(out), "--no-progress", *args]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def check_consistent(summary: dict[str, Any]) -> None:
    """Counts add up, percentiles are ordered, /metrics saw exactly the tokens the responses reported."""
    for p in summary["load_points"]:
        assert p["requests"] == sum(a["requests"] for a in p["arms"])
        assert p["tokens"] == sum(a["tokens"] for a in p["arms"])
        assert p["issued"] == p["requests"] + p["errors"] + p["cancelled"]
        for stats in [p, *p["arms"]]:
            for key in ("ttft_s", "itl_s", "e2e_s"):
                q = stats[key]
                assert q["p50"] <= q["p90"] <= q["p99"], (key, q)
        check = p["metrics_check"]
        assert check["check"] == "equal", check
        assert check["metrics_tokens"] == check["response_tokens"] == p["tokens"]
    run = summary["run"]
    assert run["tokens"] == sum(p["tokens"] for p in summary["load_points"])
    assert run["metrics_check"]["metrics_tokens"] == run["tokens"]
    assert run["exit_layer_hist"]["metrics"] == run["exit_layer_hist"]["responses"]


def check_outputs(out: Path) -> None:
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.md").read_text()
    assert report.startswith("# Load test report\n\n```bash\npython -m loadtest --url")
    assert "| load | mode | threshold | requests |" in report
    assert all(f"]({name})" in report for name in PNGS)


def test_closed_loop_interleaves_arms(url: str, prompts: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_ok(url, prompts, tmp_path, "--concurrency", "1,2", "--modes", "off", "approximate",
                     "--thresholds", "0.5,0.9", "--requests", "2", "--max-tokens", "4")
    arms = ["off", "approximate@0.5", "approximate@0.9"]
    assert summary["config"]["arms"] == arms
    assert [p["label"] for p in summary["load_points"]] == ["concurrency 1", "concurrency 2"]
    for p in summary["load_points"]:
        assert (p["planned"], p["issued"], p["requests"], p["errors"], p["stopped_by"]) == (6, 6, 6, 0, "requests")
        assert p["tokens"] == 6 * 4  # ignore_eos: every request makes max_tokens
        assert [a["requests"] for a in p["arms"]] == [2, 2, 2]
        off = p["arms"][0]
        assert off["mean_exit_layer"] == TINY_LAYERS
        assert off["speedup_vs_off"] == 1.0
        assert off["exit_layer_hist"] == {str(TINY_LAYERS): 8}
    check_consistent(summary)
    assert summary["run"]["metrics_check"]["metrics_tokens"] == 48
    records = json.loads((tmp_path / "requests.json").read_text())
    first = [r for r in records if r["load"] == 1]
    assert [r["arm"] for r in first] == arms * 2  # round-robin, request by request
    assert [r["prompt_index"] for r in first] == [0, 0, 0, 1, 1, 1]  # a round shares its prompt
    assert all(r["outcome"] == "ok" and r["tokens"] == 4 and len(r["exit_layers"]) == 4 for r in records)
    check_outputs(tmp_path)
    assert "| load | mode |" in capsys.readouterr().out


def test_chat_requests_go_to_the_chat_endpoint(url: str, tmp_path: Path) -> None:
    """A prompt file of {"messages": [...]} lines: each request is a streamed chat completion, and exact
    mode's arm makes the tokens the responses (and /metrics) count."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"the {w} of the {w} of the"}]})
                             + "\n" for w in ("king", "river", "city")))
    summary = run_ok(url, chats, tmp_path / "out", "--concurrency", "2", "--modes", "off,exact", "--requests", "2",
                     "--max-tokens", "5")
    (point,) = summary["load_points"]
    assert (point["requests"], point["errors"], point["tokens"]) == (4, 0, 4 * 5)
    check_consistent(summary)
    records = json.loads((tmp_path / "out" / "requests.json").read_text())
    assert all(r["outcome"] == "ok" and r["text_frames"] >= 1 for r in records)


def test_open_loop_by_request_count(url: str, prompts: Path, tmp_path: Path) -> None:
    summary = run_ok(url, prompts, tmp_path, "--rates", "20", "40", "--modes", "off,exact", "--requests", "3",
                     "--max-tokens", "3", "--duration", "60")
    assert [p["label"] for p in summary["load_points"]] == ["rate 20/s", "rate 40/s"]
    assert all((p["issued"], p["requests"], p["stopped_by"]) == (6, 6, "requests") for p in summary["load_points"])
    check_consistent(summary)
    check_outputs(tmp_path)


def test_duration_stops_an_open_loop_run(url: str, prompts: Path, tmp_path: Path) -> None:
    summary = run_ok(url, prompts, tmp_path, "--rates", "4", "--requests", "1000", "--duration", "1.5",
                     "--max-tokens", "2")
    (p,) = summary["load_points"]
    assert p["stopped_by"] == "duration"
    assert 0 < p["issued"] < p["planned"] == 2000
    assert p["wall_s"] < 10
    assert p["at_deadline"] == "wait"
    assert p["cancelled"] == 0
    check_consistent(summary)


@pytest.mark.timing  # two requests in flight at a 1 s deadline: true on a quiet machine
def test_cancel_at_deadline_is_counted(url: str, prompts: Path, tmp_path: Path) -> None:
    summary = run_ok(url, prompts, tmp_path, "--concurrency", "2", "--requests", "1000", "--duration", "1",
                     "--max-tokens", "100", "--at-deadline", "cancel")
    (p,) = summary["load_points"]
    assert p["stopped_by"] == "duration"
    assert p["in_flight_at_deadline"] == p["cancelled"] == 2
    assert p["issued"] == p["requests"] + p["cancelled"]
    assert p["errors"] == 0
    check = p["metrics_check"]  # the cancelled requests made tokens that no response reported
    assert check["metrics_tokens"] >= check["response_tokens"] == p["tokens"]
    assert "| 2 (cancelled) |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://10.1.2.3:8000"], "not a loopback address; pass --allow-remote"),
    (["--url", "ftp://127.0.0.1:8000"], "--url must look like"),
    (["--url", "http://127.0.0.1:9"], "no onejump server answers at http://127.0.0.1:9"),
    (["--concurrency", "0"], "argument --concurrency: must be positive, got 0"),
    (["--concurrency", "2,-1"], "argument --concurrency: must be positive, got -1"),
    (["--concurrency", "two"], "argument --concurrency: not a whole number"),
    (["--rates", "0"], "argument --rates: must be positive, got 0"),
    (["--rates", "-0.5"], "argument --rates: must be positive, got -0.5"),
    (["--requests", "0"], "argument --requests: must be positive, got 0"),
    (["--duration", "0"], "argument --duration: must be positive, got 0"),
    (["--duration", "-3"], "argument --duration: must be positive, got -3"),
    (["--max-tokens", "0"], "argument --max-tokens: must be positive"),
    (["--modes", "fast"], "unknown mode 'fast'"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "prompts file not found: /nonexistent/prompts.jsonl"),
])
def test_refusals(args: list[str], message: str, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prompts", str(prompts), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loadtest: "), err
    assert message in err, err
    assert err.count("\n") == 1, err


@pytest.mark.subprocess
def test_refusal_from_the_command_line_has_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtest", "--rates", "0"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert proc.stderr == "loadtest: argument --rates: must be positive, got 0\n"
