"""Issue 13's findings, each kept as a regression test over a real socket on the tiny random Llama:
bad input never gets a 500, one request never stalls the server, every error has the OpenAI body,
the API key guards every route but /health and /metrics, the queue forgets what timed out, streams
answer at once, start-up checks come before the model loads, SIGTERM drains, written files are
readable by others."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from support.deploy import free_port, wait_for
from support.server import ERROR_KEYS, StepGate, metric, openai_error, post, running_server, tiny_settings

from service.config import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    with running_server(tiny_settings(tiny_model_dir, queue_size=4)) as url:
        yield url


# ---------------------------------------------------------------- D1, D2, D3, D6: bad values are a 400, never a 500

BAD = [
    ({"prompt": "the", "seed": 2**64}, "seed"),  # D1: torch's overflow was a 500
    ({"prompt": "the", "seed": -1}, "seed"),
    (b'{"prompt": "abc\\ud800def"}', "surrogate"),  # D3: a lone surrogate broke the tokenizer
    (b'{"prompt": ["the \\udfff"]}', "surrogate"),
    (b'{"prompt": "the", "stop": "\\ud800"}', "surrogate"),
    ({"prompt": "the", "stream": "yes"}, "stream"),  # D6: no coercion that changes the meaning
    ({"prompt": "the", "stream": 1}, "stream"),
    ({"prompt": "the", "early_exit": {"threshold": False}}, "threshold"),
    ({"prompt": "the", "max_tokens": True}, "max_tokens"),
    ({"prompt": "the", "max_tokens": "4"}, "max_tokens"),
    ({"prompt": "the", "temperature": "1"}, "temperature"),
    ({"prompt": "the", "ignore_eos": "false"}, "ignore_eos"),
    (b'{"prompt": "the", "temperature": NaN}', "temperature"),
    (b'{"prompt": "the", "top_p": Infinity}', "top_p"),
]


@pytest.mark.parametrize(("body", "needle"), BAD)
def test_bad_values_get_a_400(server: str, body: object, needle: str) -> None:
    err = openai_error(post(server, body), 400)
    assert needle in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_lone_surrogate_in_chat_messages(server: str) -> None:
    r = post(server, b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "/v1/chat/completions")
    err = openai_error(r, 400)
    assert "surrogate" in err["message"]
    assert err["param"] == "messages.0.content"


def test_largest_seed_is_served(server: str) -> None:
    r = post(server, {"prompt": "the city", "max_tokens": 3, "temperature": 1.0, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("sampling", [{"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e-300},
                                      {"temperature": 1e-40, "top_p": 1e-45}, {"temperature": 2.0, "top_p": 5e-324}])
def test_tiny_top_p_or_temperature_keeps_the_top_token(server: str, sampling: dict) -> None:
    """D2: float32 turned top_p 1e-300 into 0 (every token cut: NaN, 500) and T 1e-300 into a
    division by zero; the server keeps the most likely token: the greedy answer."""
    body = {"prompt": "the king of the", "max_tokens": 6, "ignore_eos": True}
    greedy = post(server, body | {"temperature": 0})
    r = post(server, body | sampling | {"seed": 7})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


# ---------------------------------------------------------------- D5: one error body for every error

def test_every_error_has_the_openai_body(server: str) -> None:
    err = openai_error(post(server, b'{"prompt": "\xff\xfe caf\xe9"}'), 400)  # not UTF-8
    assert "UTF-8" in err["message"]
    deep = b'{"prompt": "a", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    openai_error(post(server, deep), 400)
    openai_error(post(server, b"{not json"), 400)
    openai_error(post(server, b""), 400)
    err = openai_error(httpx.get(f"{server}/v1/nothing"), 404)
    assert err["type"] == "not_found_error"
    r = httpx.get(f"{server}/v1/completions")
    err = openai_error(r, 405)
    assert "POST" in r.headers["allow"]
    openai_error(httpx.put(f"{server}/health"), 405)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


# ---------------------------------------------------------------- D4: big bodies, work off the event loop

def _health_while(url: str, busy: threading.Thread) -> int:
    """/health asked again and again while ``busy`` runs (each answer within 30 s, or it fails); how many
    answers came, at least one (a check that asked nothing proves nothing)."""
    busy.start()
    answers = 0
    while busy.is_alive() or not answers:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        answers += 1
    busy.join()
    return answers


def test_a_10mb_request_is_refused_and_health_stays_fast(server: str) -> None:
    """D4: a 10 MB body gets 413 from its Content-Length, before it is read; /health answers
    throughout (it answered nothing for a minute when the prompt was tokenized on the event loop)."""
    results: list[httpx.Response | Exception] = []
    body = json.dumps({"prompt": "the " * 2_500_000}).encode()

    def big() -> None:
        try:
            results.append(post(server, body))
        except httpx.HTTPError as e:  # the server may close before the client has sent it all
            results.append(e)

    assert _health_while(server, threading.Thread(target=big)) >= 1
    (r,) = results
    if isinstance(r, httpx.Response):
        err = openai_error(r, 413)
        assert "4194304 bytes" in err["message"]


@pytest.mark.slow
def test_a_big_prompt_under_the_limit_is_tokenized_off_the_event_loop(server: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3.5 MB prompt is within the body limit: it is tokenized in a worker thread (then refused for its
    length) while /health keeps answering. Its tokenization waits until /health has answered: were it on
    the event loop, /health could not answer and the test would fail (no timing involved)."""
    from service.serving import Serving

    tokenizing, answered = threading.Event(), threading.Event()
    tokenize = Serving.prompts

    def gated(self: Serving, req: Any) -> Any:
        tokenizing.set()
        answered.wait(60)
        return tokenize(self, req)

    monkeypatch.setattr(Serving, "prompts", gated)
    results: list[httpx.Response] = []
    body = {"prompt": "the city " * 400_000}
    busy = threading.Thread(target=lambda: results.append(post(server, body)))
    busy.start()
    try:
        assert tokenizing.wait(60), "the request never reached tokenization"
        assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    finally:
        answered.set()
        busy.join()
    err = openai_error(results[0], 400)
    assert "the limit is" in err["message"]


def test_chunked_body_over_the_limit_gets_413(tiny_model_dir: Path) -> None:
    with running_server(tiny_settings(tiny_model_dir, max_body_bytes=4096)) as url:
        def chunks() -> Iterator[bytes]:
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"the " * 256
            yield b'"}'

        r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        err = openai_error(r, 413)
        assert "ONEJUMP_MAX_BODY_BYTES" in err["message"]
        openai_error(post(url, {"prompt": "the " * 2000}), 413)
        assert post(url, {"prompt": "the city", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------- D8, D9, D10: the API key

def test_the_key_guards_every_route_but_health_and_metrics(tiny_model_dir: Path) -> None:
    with running_server(tiny_settings(tiny_model_dir, api_key=SecretStr("s3cret"))) as url:
        for path in ("/", "/docs", "/redoc", "/openapi.json", "/ready", "/v1/models", "/v1/nothing"):
            err = openai_error(httpx.get(f"{url}{path}"), 401)
            assert err["type"] == "authentication_error"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        # D9: the key is checked before the body is read or validated
        openai_error(post(url, b"{not json"), 401)
        openai_error(post(url, {"prompt": "a", "max_tokens": -1}), 401)
        openai_error(post(url, b"x" * (5 * 2**20)), 401)
        openai_error(post(url, {"prompt": "the"}, headers={"Authorization": "Bearer s3cretX"}), 401)
        openai_error(post(url, {"prompt": "the"}, headers={"Authorization": "Basic s3cret"}), 401)
        # D10: the scheme in any case
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = post(url, {"prompt": "the", "max_tokens": 1}, headers={"Authorization": f"{scheme} s3cret"})
            assert r.status_code == 200, (scheme, r.text)
        assert httpx.get(f"{url}/docs", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_an_empty_key_means_no_auth(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """D10: ONEJUMP_API_KEY= (compose passes it empty when unset) is no key, not the empty key."""
    monkeypatch.setenv("ONEJUMP_API_KEY", "")
    assert Settings().api_key is None
    assert Settings(api_key="  ").api_key is None
    with running_server(tiny_settings(tiny_model_dir, api_key="")) as url:
        assert post(url, {"prompt": "the", "max_tokens": 1}).status_code == 200


# ---------------------------------------------------------------- D7: a 504 frees its queue slot

def _held_slot(url: str, gate: StepGate) -> threading.Thread:
    """A generation that holds the one slot until ``gate`` opens (its steps wait)."""
    body = {"prompt": "the king", "max_tokens": 10, "ignore_eos": True}
    thread = threading.Thread(target=post, args=(url, body))
    thread.start()
    gate.wait_entered()
    return thread


def test_a_timed_out_request_frees_its_queue_slot_at_once(tiny_model_dir: Path, step_gate: StepGate) -> None:
    with running_server(tiny_settings(tiny_model_dir, queue_size=1, request_timeout_s=0.4, max_batch_size=1)) as url:
        slow = _held_slot(url, step_gate)
        r = post(url, {"prompt": "the river", "max_tokens": 2})
        openai_error(r, 504)
        # at once, while the slot is still busy: nobody waits, and the failure is counted
        assert metric(url, "onejump_num_requests_waiting") == 0
        assert metric(url, "onejump_request_failure_total", reason="timeout") == 1
        again = post(url, {"prompt": "the sea", "max_tokens": 2})
        assert again.status_code == 504, again.text  # queued again (not 429: the slot was free)
        assert metric(url, "onejump_request_failure_total", reason="queue_full") == 0
        assert slow.is_alive()  # the slot is still held
        step_gate.open()
        slow.join()
        assert metric(url, "onejump_request_failure_total", reason="timeout") == 2
        assert post(url, {"prompt": "the sea", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------- streams answer at once

def test_a_queued_stream_gets_headers_and_a_first_frame_at_once(tiny_model_dir: Path, step_gate: StepGate) -> None:
    """Headers and a first frame while the one slot is held (its steps wait): they do not wait for it."""
    with running_server(tiny_settings(tiny_model_dir, queue_size=2, request_timeout_s=0.8, max_batch_size=1)) as url:
        slow = _held_slot(url, step_gate)
        body = {"messages": [{"role": "user", "content": "the"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln)
            assert slow.is_alive()  # the first frame came while the slot was held
            rest = [ln for ln in lines if ln]
        frame = json.loads(first.removeprefix("data: "))
        assert frame["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        # it then waits past its 0.8 s timeout: an error frame with the 504, then [DONE]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert (error["code"], error["type"]) == (504, "timeout")
        assert set(error) == ERROR_KEYS
        assert rest[-1] == "data: [DONE]"
        step_gate.open()
        slow.join()


# ---------------------------------------------------------------- graceful shutdown

def test_draining_refuses_new_requests_with_503(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from support import server

    from service.app import create_app

    apps = []
    monkeypatch.setattr(server, "create_app", lambda s: apps.append(create_app(s)) or apps[-1])
    with running_server(tiny_settings(tiny_model_dir)) as url:
        apps[0].state.engine.drain()  # what SIGTERM does
        err = openai_error(post(url, {"prompt": "the"}), 503)
        assert "shutting down" in err["message"]
        openai_error(httpx.get(f"{url}/ready"), 503)
        assert httpx.get(f"{url}/health").status_code == 200


LAUNCH = """
import sys, time
from shortcuts.engine.batch import BatchDecoder
step = BatchDecoder.step
BatchDecoder.step = lambda self: (time.sleep(0.05), step(self))[1]  # 50 ms a token
from service.__main__ import run
run(sys.argv[1:])
"""


def _serve(folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--model", str(folder), "--jump", "", "--device", "cpu",
                             "--port", str(port), "--max-new-tokens", "120", *flags], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the server never became ready"
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def _stream_after_sigterm(proc: subprocess.Popen, url: str, max_tokens: int) -> list[dict]:
    """Starts a stream, sends SIGTERM after its first token; the frames it got, which must end in [DONE]."""
    body = {"prompt": "the", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
            if len(lines) == 2 and line:  # the first frame, then the first token (once: not on the blank line)
                proc.terminate()
                wait_for(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 503, 30,
                         lambda: "SIGTERM: the server still says it is ready")
                assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # the socket stays open
                openai_error(post(url, {"prompt": "the"}), 503)  # new requests: 503 (issue 22)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_lets_running_generations_finish(tiny_model_dir: Path) -> None:
    proc, url = _serve(tiny_model_dir, "--shutdown-timeout-s", "20")
    try:
        frames = _stream_after_sigterm(proc, url, max_tokens=40)  # 2 s of work left
        assert frames[-1]["usage"]["completion_tokens"] == 40
        assert frames[-1]["choices"][0]["finish_reason"] == "length"
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode in (0, -15), out
        assert "Traceback" not in out, out
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_cancels_what_runs_past_the_deadline(tiny_model_dir: Path) -> None:
    proc, url = _serve(tiny_model_dir, "--shutdown-timeout-s", "1")
    try:
        frames = _stream_after_sigterm(proc, url, max_tokens=120)  # 6 s of work left
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode in (0, -15), out
        assert not any("usage" in f for f in frames)  # cut short, no final frame
        error = frames[-1]["error"]  # but a clean end: an error frame, then [DONE]
        assert (error["code"], error["type"]) == (503, "service_unavailable")
        assert "grace period" in error["message"]  # cancelled at the deadline, not run to the end
        assert "Traceback" not in out, out
    finally:
        proc.kill()


# ---------------------------------------------------------------- start-up checks

def _start(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "service", *flags], capture_output=True, text=True, cwd=ROOT,
                         env=(env or dict(os.environ)) | {"PYTHONPATH": str(ROOT)}, timeout=120)
    return out.returncode, out.stderr, time.monotonic() - t0


@pytest.mark.subprocess
def test_a_busy_port_stops_start_up_before_the_model_loads(tiny_model_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err, _ = _start("--model", str(tiny_model_dir), "--jump", "", "--port", str(port))
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in err
    assert "engine ready" not in err
    assert "loaded" not in err


@pytest.mark.subprocess
def test_bad_settings_are_named_as_the_user_sets_them() -> None:
    code, err, _ = _start("--default-max-tokens", "600", "--max-new-tokens", "512", "--queue-size", "0")
    assert code == 2
    assert "--queue-size / ONEJUMP_QUEUE_SIZE" in err
    assert "self." not in err
    assert "pydantic" not in err
    code, err, _ = _start("--default-max-tokens", "600", "--max-new-tokens", "512")
    assert "default_max_tokens=600 exceeds max_new_tokens=512" in err
    assert "self." not in err


# root reads every file: the child drops to user nobody once its imports are done (the interpreter
# may live under a folder nobody cannot enter)
AS_NOBODY = "if os.geteuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is under a 0700 folder)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="onejump-h13-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.subprocess
def test_unreadable_files_are_named_before_the_model_loads(tiny_model_dir: Path, shared_tmp: Path) -> None:
    import shutil

    folder = shared_tmp / "model"
    shutil.copytree(tiny_model_dir, folder)
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)
    (folder / "model.safetensors").chmod(0o600)
    code = ("import os, sys; from service.config import Settings; from service.loading import preflight\n"
            f"{AS_NOBODY}try: preflight(Settings(model={str(folder)!r}, jump=''))\n"
            "except PermissionError as e: print(e); sys.exit(3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "HOME": str(shared_tmp)})
    assert out.returncode == 3, out.stdout + out.stderr
    assert "model.safetensors exists but cannot be read: mode 600" in out.stdout
    assert "No such file" not in out.stdout


# ---------------------------------------------------------------- files the project writes

def _tiny_artifact():
    from shortcuts.artifact import JumpArtifact
    from shortcuts.jump import JumpConfig, LowRankJumps

    bank = LowRankJumps(JumpConfig.from_variant("pure-mse", 32, 4), n=1)
    return JumpArtifact(bank.eval(), "tiny", {}, 4, 2, [1.0, 2.0, 3.0], "words.txt")


def test_written_files_are_readable_by_others(tmp_path: Path) -> None:
    from shortcuts.assets import share

    old = os.umask(0o077)  # as strict as it gets: the writers must still share what they write
    try:
        path = _tiny_artifact().save(tmp_path / "jumps" / "jump.safetensors")
        folder = tmp_path / "model"
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "w.safetensors").write_bytes(b"x")
        (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    share(folder)
    modes = {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}
    assert modes == {"sub": 0o755, "sub/w.safetensors": 0o644, "config.json": 0o644}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.subprocess
def test_an_unreadable_jump_says_so(shared_tmp: Path) -> None:
    path = _tiny_artifact().save(shared_tmp / "jump.safetensors")
    path.chmod(0o600)
    code = ("import os; from shortcuts.artifact import JumpArtifact\n"
            f"{AS_NOBODY}try: JumpArtifact.load({str(path)!r})\n"
            "except Exception as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "HOME": str(shared_tmp)})
    assert "exists but cannot be read: mode 600" in out.stdout, out.stdout + out.stderr
    assert "not found" not in out.stdout
