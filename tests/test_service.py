"""The HTTP service over a real socket, on a tiny random Llama: OpenAI client, streaming, errors,
auth, overload, disconnects and metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr, ValidationError
from support.server import StepGate, client, metric, metrics, running_server, tiny_settings

from service.config import Settings, parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    with running_server(tiny_settings(tiny_model_dir, queue_size=4)) as url:
        yield url


def test_completion_with_the_openai_client(server: str) -> None:
    resp = client(server).completions.create(model="tiny-llama", prompt="the king of the", max_tokens=6,
                                             extra_body={"early_exit": {"mode": "approximate", "threshold": 0.0}})
    assert resp.usage.completion_tokens == 6
    assert resp.usage.prompt_tokens == 4
    report = resp.model_extra["early_exit"]
    assert report["exit_layers"] == [4] + [1] * 5  # threshold 0 leaves at the first check
    assert report["mean_exit_layer"] == pytest.approx((4 + 5) / 6)
    assert resp.choices[0].finish_reason == "length"


def test_exact_mode_drafts_up_to_the_requests_max_draft(server: str) -> None:
    """max_draft bounds the drafts one verification checks: with 1 every other step verifies."""
    reports = {}
    for d in (1, 4):
        resp = client(server).completions.create(model="tiny-llama", prompt="the king of the", max_tokens=9,
                                                 extra_body={"early_exit": {"mode": "exact", "threshold": 0.0,
                                                                            "max_draft": d, "draft": "exit"}})
        reports[d] = resp.model_extra["early_exit"]["exit_layers"]
    assert reports[1] != reports[4]
    assert all(a == 4 or b == 4 for a, b in zip(reports[1][1:], reports[1][2:], strict=False))  # no 2 drafts in a row


def test_exact_mode_drafts_from_the_prompt_and_reports_by_source(server: str) -> None:
    """early_exit.draft "ngram": the text is full depth's, the report and the spec-decode counters say how
    many tokens each source drafted and how many the full model kept."""
    prompt = "the king of the river and the king of the river and the king of the"
    off = client(server).completions.create(model="m", prompt=prompt, max_tokens=12,
                                            extra_body={"early_exit": {"mode": "off"}})
    before = {k: metric(server, f"onejump_spec_decode_num_{k}_tokens_total", source="ngram") for k in ("draft",
                                                                                                      "accepted")}
    resp = client(server).completions.create(model="m", prompt=prompt, max_tokens=12,
                                             extra_body={"early_exit": {"mode": "exact", "draft": "ngram",
                                                                        "max_draft": 6, "ngram_max": 3}})
    assert resp.choices[0].text == off.choices[0].text
    report = resp.model_extra["early_exit"]
    assert report["drafted"]["ngram"] >= report["accepted"].get("ngram", 0)
    assert report["drafted"]["ngram"] > 0
    assert 1 <= report["verifications"] <= 12
    assert off.model_extra["early_exit"]["drafted"] is None  # not exact mode: nothing to report
    drafted = metric(server, "onejump_spec_decode_num_draft_tokens_total", source="ngram") - before["draft"]
    kept = metric(server, "onejump_spec_decode_num_accepted_tokens_total", source="ngram") - before["accepted"]
    assert (drafted, kept) == (report["drafted"]["ngram"], report["accepted"].get("ngram", 0))
    series = metrics(server)  # every source's series exists from the start
    assert any(k.startswith("onejump_spec_decode_num_draft_tokens_total") and '"source": "exit"' in k for k in series)


def test_chat_and_stream_agree(server: str) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "the city of the river"}]
    full = c.chat.completions.create(model="m", messages=messages, max_tokens=7)
    chunks = list(c.chat.completions.create(model="m", messages=messages, max_tokens=7, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    plain = c.completions.create(model="m", prompt="the war", max_tokens=5)
    pieces = c.completions.create(model="m", prompt="the war", max_tokens=5, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_raw_sse_frames_end_with_done(server: str) -> None:
    with httpx.stream("POST", f"{server}/v1/completions",
                      json={"prompt": "the north", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200
    assert lines[-1] == "data: [DONE]"
    bodies = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert bodies[-1]["usage"]["completion_tokens"] == 3
    assert len(bodies[-1]["early_exit"]["exit_layers"]) == 3


BAD = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**6}, "exceeds"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": "the " * 200}, "limit is"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"threshold": 1.5}}, "threshold"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"gate": "vibes"}}, "gate"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"mode": "fast"}}, "mode"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"min_layer": 9}}, "min_layer"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"mode": "exact", "max_draft": 0}}, "max_draft"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"mode": "exact", "draft": "oracle"}}, "draft"),
    ("/v1/completions", {"prompt": "a", "early_exit": {"ngram_min": 3, "ngram_max": 2}}, "ngram_max"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
]


@pytest.mark.parametrize(("path", "body", "needle"), BAD)
def test_bad_input_gets_a_clear_400(server: str, path: str, body: object, needle: str) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["type"] == "invalid_request_error"
    ok = httpx.post(f"{server}/v1/completions", json={"prompt": "the city", "max_tokens": 2})
    assert ok.status_code == 200  # and the server keeps serving


def test_stop_strings(server: str) -> None:
    extra = {"ignore_eos": True}
    first = client(server).completions.create(model="m", prompt="the old", max_tokens=8, extra_body=extra)
    words = first.choices[0].text.split()
    assert words, "the tiny model generated no words"
    stop = words[min(2, len(words) - 1)]
    resp = client(server).completions.create(model="m", prompt="the old", max_tokens=8, stop=[stop], extra_body=extra)
    assert stop not in resp.choices[0].text
    assert first.choices[0].text.startswith(resp.choices[0].text)
    assert resp.choices[0].finish_reason == "stop"


def test_models_health_ready(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").status_code == 200
    assert [m.id for m in client(server).models.list()] == ["tiny-llama", "m"]  # the served name, then aliases


def test_metrics_count_the_generated_tokens(server: str) -> None:
    before = metric(server, "onejump_exit_layer_count")
    gen_before = metric(server, "onejump_generation_tokens_total")
    resp = client(server).completions.create(model="m", prompt="the world", max_tokens=5,
                                             extra_body={"early_exit": {"mode": "approximate", "threshold": 0.0}})
    assert resp.usage.completion_tokens == 5
    assert metric(server, "onejump_exit_layer_count") - before == 5
    assert metric(server, "onejump_generation_tokens_total") - gen_before == 5
    assert metric(server, "onejump_tokens_total", exit="early") >= 4
    assert metric(server, "onejump_layers_skipped_total") > 0
    assert metric(server, "onejump_request_success_total", finished_reason="length") >= 1


def test_api_key(tiny_model_dir: Path) -> None:
    with running_server(tiny_settings(tiny_model_dir, api_key=SecretStr("s3cret"))) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers=headers)
            assert r.status_code == 401
            assert "API key" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "s3cret").completions.create(model="m", prompt="the", max_tokens=1).usage


def _hammer(url: str, n: int, max_tokens: int) -> list[int]:
    codes: list[int] = []

    def one() -> None:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the city", "max_tokens": max_tokens,
                                                      "early_exit": {"mode": "off"}}, timeout=120)
        codes.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_overload_gets_429_and_timeouts_504(tiny_model_dir: Path) -> None:
    # 2 decoding + 1 waiting: the other requests of the burst find the queue full
    with running_server(tiny_settings(tiny_model_dir, queue_size=1, max_batch_size=2, max_new_tokens=120,
                                      default_max_tokens=8)) as url:
        codes = _hammer(url, 12, 120)
        assert 429 in codes
        assert 200 in codes
        assert set(codes) <= {200, 429}
        assert metric(url, "onejump_request_failure_total", reason="queue_full") == codes.count(429)
    # one at a time (max_batch_size 1, as before batching): the later requests wait past the timeout
    with running_server(tiny_settings(tiny_model_dir, queue_size=8, request_timeout_s=0.05, max_new_tokens=120,
                                      default_max_tokens=8, max_batch_size=1)) as url:
        codes = _hammer(url, 4, 120)
        assert 504 in codes
        # a timeout is counted before its 504 is sent (by the client's side or by the worker, never both)
        assert metric(url, "onejump_request_failure_total", reason="timeout") == codes.count(504)


def test_queue_timeout_answers_without_waiting_for_a_slot(tiny_model_dir: Path, step_gate: StepGate) -> None:
    """The one slot is held by a generation whose steps wait (``step_gate``): a queued request gets its
    504 at its timeout while the slot is still held, not when it frees."""
    with running_server(tiny_settings(tiny_model_dir, queue_size=4, request_timeout_s=0.5, max_batch_size=1)) as url:
        body = {"prompt": "the king", "max_tokens": 10, "ignore_eos": True}
        slow = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                kwargs={"json": body, "timeout": 120})
        slow.start()
        step_gate.wait_entered()  # it holds the slot
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the river", "max_tokens": 4}, timeout=120)
        assert r.status_code == 504, r.text
        assert "request timeout" in r.json()["error"]["message"]
        assert slow.is_alive()  # the slot was never freed
        assert metric(url, "onejump_request_failure_total", reason="timeout") == 1
        step_gate.open()
        slow.join()
        assert metric(url, "onejump_request_failure_total", reason="timeout") == 1


def _complete(url: str, prompt: str, early_exit: dict, barrier: threading.Barrier | None = None) -> dict:
    if barrier is not None:
        barrier.wait()
    r = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": 80, "ignore_eos": True, "early_exit": early_exit})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"text": body["choices"][0]["text"], "exit_layers": body["early_exit"]["exit_layers"]}


def test_concurrent_requests_are_decoded_together(server: str) -> None:
    """Four requests sent at once share token steps (a step decodes more than one of them), and
    each gets exactly what it gets alone."""
    jobs = [("the city of the", {"mode": "off"}), ("war", {"mode": "off"}),
            ("the king of the north river", {"mode": "approximate", "threshold": 0.0}),
            ("a new song", {"mode": "approximate", "threshold": 0.0, "min_layer": 2})]
    alone = [_complete(server, p, ee) for p, ee in jobs]
    steps, single = metric(server, "onejump_batch_size_count"), metric(server, "onejump_batch_size_bucket", le="1.0")
    barrier = threading.Barrier(len(jobs))
    together: list[dict] = [{}] * len(jobs)

    def run(k: int) -> None:
        together[k] = _complete(server, *jobs[k], barrier=barrier)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    shared = (metric(server, "onejump_batch_size_count") - steps) - (
        metric(server, "onejump_batch_size_bucket", le="1.0") - single)
    assert shared > 0, "no token step decoded two requests together"
    assert alone[2]["exit_layers"] == [4] + [1] * 79
    assert alone[3]["exit_layers"] == [4] + [2] * 79


def test_a_failing_step_fails_its_requests_and_the_batch_recovers(server: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from shortcuts.engine.batch import BatchDecoder

    def broken(self: BatchDecoder) -> list:
        raise RuntimeError("boom")

    before = metric(server, "onejump_request_failure_total", reason="error")
    with monkeypatch.context() as m:
        m.setattr(BatchDecoder, "step", broken)
        r = httpx.post(f"{server}/v1/completions", json={"prompt": "the city", "max_tokens": 5})
    assert r.status_code == 500
    assert "generation failed: boom" in r.json()["error"]["message"]
    assert metric(server, "onejump_request_failure_total", reason="error") == before + 1
    ok = httpx.post(f"{server}/v1/completions", json={"prompt": "the city", "max_tokens": 5})
    assert ok.status_code == 200
    assert ok.json()["usage"]["completion_tokens"] == 5


def test_disconnect_cancels_generation(tiny_model_dir: Path) -> None:
    with running_server(tiny_settings(tiny_model_dir, max_new_tokens=400)) as url:
        with httpx.stream("POST", f"{url}/v1/completions",
                          json={"prompt": "the", "max_tokens": 400, "stream": True}) as r:
            next(r.iter_lines())  # the first frame, then hang up
        deadline = time.monotonic() + 30
        while metric(url, "onejump_request_failure_total", reason="cancelled") < 1:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
        assert metric(url, "onejump_generation_tokens_total") < 400


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValidationError, match="quantization"):
        Settings(quantization="8bit")  # the engine's names: none, int8, int4, bnb-8bit, bnb-4bit
    with pytest.raises(ValidationError, match="does not compile"):
        Settings(quantization="bnb-4bit", compile=True)
    assert Settings(quantization="bnb-4bit", device="cpu").quantization == "bnb-4bit"  # bitsandbytes runs on CPUs
    with pytest.raises(ValidationError, match="exit_threshold"):
        Settings(exit_threshold=2.0)
    with pytest.raises(ValidationError, match="queue_size"):
        parse_args(["--queue-size", "0"])
    with pytest.raises(ValidationError, match="max_batch_size"):
        parse_args(["--max-batch-size", "0"])
    assert parse_args(["--port", "9001"]).port == 9001


def test_env_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEJUMP_PORT", "8123")
    monkeypatch.setenv("ONEJUMP_EXIT_MODE", "exact")
    monkeypatch.setenv("ONEJUMP_MAX_BATCH_SIZE", "3")
    s = parse_args([])
    assert (s.port, s.exit_mode, s.max_batch_size) == (8123, "exact", 3)
    assert parse_args(["--port", "8124"]).port == 8124  # flags win over the environment
